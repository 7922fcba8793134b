"""``clbench sweep``: the options of ``clbench run`` with lists, a grid, and a launcher.

Example on a SLURM cluster (one GPU and 8 CPUs per run, at most 16 runs at once)::

    clbench sweep --methods keeplora,inflora,lora --orders 1,2 --seeds 0,1,2 \\
        --benchmark mtil --data-root /data/MTIL --backbone ViT-B-16 --pretrained openai \\
        --grid keeplora.eps_w_vision=0.8,0.85,0.9 --out results \\
        --launcher slurm --partition gpu --time 12:00:00 --gpus-per-job 1 --cpus-per-job 8 --jobs 16 \\
        --slurm-param account=myproject

Re-issuing the same command after a crash runs only what is missing; ``--dry-run`` lists the runs first. Every
setting takes the same command: the setting of ``--benchmark`` (:mod:`clbench.settings`) plans its runs and
everything after the plan (launchers, dry run, live view, summary) is shared.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from clbench.cli.consoles import make_console
from clbench.cli.options import (
    AllowIncomplete,
    Backbone,
    DataRoot,
    Datasets,
    Device,
    EvalRule,
    Methods,
    OutFolder,
    Precision,
    PresetName,
    Pretrained,
    RunBenchmarkName,
    Sets,
    Shots,
    SkipBadImages,
)
from clbench.errors import UserError
from clbench.sweeps.plan import (
    DONE,
    INVALID,
    RunReport,
    RunSpec,
    is_started,
    record_failure,
    remove_empty_staging,
    run_status,
    split_list,
)

SLURM_EXAMPLE = """clbench sweep --methods keeplora,inflora,lora --orders 1,2 --seeds 0,1,2
    --benchmark mtil --data-root /data/MTIL --backbone ViT-B-16 --pretrained openai
    --grid keeplora.eps_w_vision=0.8,0.85,0.9 --out results
    --launcher slurm --partition gpu --time 12:00:00 --gpus-per-job 1 --cpus-per-job 8 --jobs 16
    --slurm-param account=myproject"""

console = make_console(stderr=True)
out_console = make_console()


def register(app: typer.Typer) -> None:
    """Add ``clbench sweep`` to ``app``."""
    app.command("sweep", epilog=f"SLURM example: {' '.join(SLURM_EXAMPLE.split())}")(sweep)


def sweep(
    methods: Methods,
    orders: Annotated[str, typer.Option(help="comma-separated task orders, e.g. 1,2")] = "1",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds, e.g. 0,1,2")] = "0",
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", help="a swept setting, key=v1,v2,... (repeatable); method.key sweeps that method's runs only")]
    = None,
    benchmark: RunBenchmarkName = "synthetic",
    eval_: EvalRule = None,
    out: OutFolder = Path("results"),
    preset: PresetName = "default",
    backbone: Backbone = "tiny",
    pretrained: Pretrained = "",
    data_root: DataRoot = "",
    device: Device = "auto",
    precision: Precision = None,
    shots: Shots = None,
    skip_bad_images: SkipBadImages = False,
    datasets: Datasets = "",
    allow_incomplete: AllowIncomplete = False,
    set_: Sets = None,
    launcher: Annotated[str, typer.Option(help="local (process pool), ray, slurm, or inline (this process)")]
    = "local",
    jobs: Annotated[int, typer.Option(help="most runs at once (0: local = CPUs / --cpus-per-job, or 1 on a GPU; "
                                           "ray/slurm = no cap)", min=0)] = 0,
    cpus_per_job: Annotated[int, typer.Option(help="CPU threads of one run (also Ray's num_cpus and SLURM's "
                                                   "cpus-per-task)", min=1)] = 1,
    gpus_per_job: Annotated[float, typer.Option(help="GPUs of one run (ray: may be fractional; slurm: whole)",
                                                min=0.0)] = 0.0,
    ray_address: Annotated[str, typer.Option(help="Ray cluster address (default: start a local instance)")] = "",
    partition: Annotated[str, typer.Option(help="SLURM partition")] = "",
    time_limit: Annotated[str, typer.Option("--time", help="SLURM time limit of one run: minutes or [D-]HH:MM:SS")]
    = "",
    slurm_param: Annotated[list[str] | None, typer.Option(
        "--slurm-param", help="another sbatch option as key=value, e.g. account=myproject (repeatable)")] = None,
    submitit_cluster: Annotated[str, typer.Option(hidden=True, help="submitit executor (tests: local)")] = "slurm",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the runs and what would happen; run nothing")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no live view")] = False,
) -> None:
    """Run every (method, order, seed, grid point); runs whose complete results exist are skipped."""
    names = split_list(methods, "--methods")
    if len(set(names)) != len(names):
        raise UserError(f"--methods {methods!r} repeats a method; give each once")
    launch = {"launcher": launcher, "jobs": jobs, "cpus": cpus_per_job, "gpus": gpus_per_job,
              "ray_address": ray_address, "partition": partition, "time_limit": time_limit,
              "params": list(slurm_param or []), "cluster": submitit_cluster, "device": device}
    from clbench.settings import SweepOptions, setting_for_benchmark

    setting = setting_for_benchmark(benchmark)
    setting.check_options("sweep", {
        "--orders": orders != "1", "--eval": eval_, "--pretrained": pretrained, "--precision": precision,
        "--shots": shots, "--skip-bad-images": skip_bad_images, "--datasets": datasets,
        "--allow-incomplete": allow_incomplete}, benchmark)
    setting.require(benchmark)
    plan = setting.plan_sweep(SweepOptions(
        methods=names, benchmark=benchmark, out=out, preset=preset, backbone=backbone, pretrained=pretrained,
        data_root=data_root, device=device, precision=precision, eval=eval_, shots=shots,
        skip_bad_images=skip_bad_images, datasets=datasets, allow_incomplete=allow_incomplete,
        sets=list(set_ or []), quiet=quiet, orders=orders, seeds=seeds, grid=list(grid or []),
        cpus_per_job=cpus_per_job), console)
    _launch(plan.specs, plan.out, dry_run, quiet, launch, plan.prepare, plan.columns)


def _launch(specs: list[RunSpec], out: Path, dry_run: bool, quiet: bool, launch: dict, prepare: Callable[[], None],
            columns: list[tuple[str, str]]) -> None:
    """The planned runs of a sweep (CLIP or MCIT): list them (``--dry-run``), or run what is not done through the
    chosen launcher under the live view, then print the summary (exit 1 when a run failed)."""
    from clbench.sweeps.launchers import make_launcher

    statuses = {s.id: run_status(s) for s in specs}
    if dry_run:
        _print_plan(specs, statuses, out)
        return
    to_run = [s for s in specs if statuses[s.id] not in (DONE, INVALID)]
    name, device, cpus = launch["launcher"], launch["device"], launch["cpus"]
    chosen = make_launcher(name, jobs=launch["jobs"] or _auto_jobs(name, device, cpus), cpus=cpus,
                           gpus=launch["gpus"], ray_address=launch["ray_address"], slurm_folder=out / ".sweep" /
                           "slurm", time_limit=launch["time_limit"], partition=launch["partition"],
                           params=launch["params"], cluster=launch["cluster"])
    reports = [record_failure(s, s.error or "invalid configuration") for s in specs if statuses[s.id] == INVALID]
    skipped = sum(1 for s in specs if statuses[s.id] == DONE)
    if to_run:
        prepare()
    with SweepView(to_run, skipped, reports, quiet, console) as view:
        reports += chosen.run(to_run, view) if to_run else []
    remove_empty_staging(out)
    _print_summary(specs, reports, skipped, columns)
    if any(r.status != "complete" for r in reports):
        raise typer.Exit(1)


def _auto_jobs(launcher: str, device: str, cpus: int) -> int:
    """Default ``--jobs``: local runs fill the CPUs (one at a time on a GPU); engines schedule themselves."""
    if launcher != "local":
        return 0
    if device.startswith("cuda"):
        return 1
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return 1
    return max(1, (os.cpu_count() or 1) // cpus)


class SweepView:
    """A live view of the sweep: counts of queued / running / done / failed runs and the runs in flight."""

    def __init__(self, specs: list[RunSpec], skipped: int, failed: list[RunReport], quiet: bool,
                 console: Console) -> None:
        self.specs = {s.id: s for s in specs}
        self.skipped = skipped
        self.reports: dict[str, RunReport] = {r.id: r for r in failed}
        self.started: dict[str, float] = {}
        self.console = console
        self.log_lines = not quiet and not console.is_terminal  # a log instead of a live view (CI, batch jobs)
        self.live = Live(self.render(), console=console, refresh_per_second=4, transient=False) \
            if not quiet and console.is_terminal else None
        self._polled = 0.0

    def __enter__(self) -> SweepView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self.render(), refresh=True)
            self.live.__exit__(*exc)

    def finished(self, report: RunReport) -> None:
        self.reports[report.id] = report
        self.started.pop(report.id, None)
        if self.log_lines and report.id in self.specs:
            finished = sum(1 for rid in self.reports if rid in self.specs)
            name = self.specs[report.id].name
            self.console.print(f"[{finished}/{len(self.specs)}] {report.status} {name} ({report.id}, "
                               f"{report.seconds:.0f}s)", highlight=False, soft_wrap=True, markup=False)
        self._refresh()

    def tick(self) -> None:
        now = time.time()
        if now - self._polled >= 1.0:  # a file-system poll: a marker the worker writes when a run starts
            self._polled = now
            for rid, spec in self.specs.items():
                if rid not in self.reports and rid not in self.started and is_started(spec):
                    self.started[rid] = now
        self._refresh()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def counts(self) -> dict[str, int]:
        done = sum(1 for r in self.reports.values() if r.status == "complete")
        failed = len(self.reports) - done
        running = len(self.started)
        queued = len(self.specs) - running - sum(1 for rid in self.reports if rid in self.specs)
        return {"queued": queued, "running": running, "done": done, "failed": failed, "skipped": self.skipped}

    def render(self) -> Group:
        c = self.counts()
        head = Text.assemble(("sweep: ", "bold"), f"{c['queued']} queued · ", (f"{c['running']} running", "cyan"),
                             " · ", (f"{c['done']} done", "green"), " · ", (f"{c['failed']} failed", "red"),
                             f" · {c['skipped']} already done")
        table = Table(box=None, show_header=bool(self.started), padding=(0, 1))
        for col in ("running", "id", "elapsed"):
            table.add_column(col)
        now = time.time()
        for rid, since in sorted(self.started.items(), key=lambda kv: kv[1]):
            table.add_row(self.specs[rid].name, rid, f"{now - since:.0f}s")
        return Group(head, table) if self.started else Group(head)


def _print_plan(specs: list[RunSpec], statuses: dict[str, str], out: Path) -> None:
    """One plain line per run (id, method, order, seed, grid point, status), then the folder it writes."""
    runs = sum(1 for s in specs if statuses[s.id] not in (DONE, INVALID))
    done = sum(1 for v in statuses.values() if v == DONE)
    invalid = sum(1 for v in statuses.values() if v == INVALID)
    typer.echo(f"sweep: {len(specs)} runs in {out}: {runs} to run, {done} done, {invalid} invalid")
    rows = [("id", "method", "order", "seed", "grid point", "status")]
    for s in specs:
        status = statuses[s.id]
        text = "done (skip)" if status == DONE else status if status == INVALID else f"would run ({status})"
        rows.append((s.id, s.method, str(s.order), str(s.seed), s.grid_text, text))
    _echo_rows(rows)
    typer.echo("folders:")
    for spec in specs:
        typer.echo(f"  {spec.id}  {Path(spec.folder).relative_to(out)}" + (f"  ({spec.error})" if spec.error else ""))


def _print_summary(specs: list[RunSpec], reports: list[RunReport], skipped: int,
                   columns: list[tuple[str, str]]) -> None:
    """One line per run that ran (id, method, order, seed, grid point, status, metrics), then the failures."""
    by_id = {s.id: s for s in specs}
    rows = [("id", "method", "order", "seed", "grid point", "status", *(label for label, _ in columns), "seconds")]
    for r in sorted(reports, key=lambda r: specs.index(by_id[r.id])):
        s = by_id[r.id]
        cells = [f"{r.metrics[k]:.1f}" if k in r.metrics else "-" for _, k in columns]
        rows.append((r.id, s.method, str(s.order), str(s.seed), s.grid_text, r.status, *cells, f"{r.seconds:.0f}"))
    if reports:
        _echo_rows(rows)
    failed = [r for r in reports if r.status != "complete"]
    plural = "s" if len(specs) != 1 else ""
    typer.echo(f"{len(specs)} run{plural}: {len(reports) - len(failed)} complete, {len(failed)} failed, "
               f"{skipped} already done (skipped)")
    for r in failed:
        first = (r.error or "unknown error").strip().splitlines()[0]
        console.print(Text.assemble(("failed", "red"), f" {by_id[r.id].name} ({r.id}): {first} — see "
                                    f"{Path(r.folder) / 'error.txt'}"), highlight=False, soft_wrap=True)


def _echo_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
