"""The clbench / official-style ratio table of issue 10, measured side by side in one process.

    python -m benchmarks.ratios                       # small shapes (tiny backbone), a minute or two
    python -m benchmarks.ratios --full                # ViT-B-16 shapes (see --help for the sizes)
    python -m benchmarks.ratios --full --only grad,features --grad-batch 4 --out ratios.csv

Times are medians of ``--repeats`` untracked runs (device-synchronised); memory is the peak of the tensors
each implementation creates (:class:`clbench.costs.profiler.TensorPeakTracker`, one extra tracked run). Every row
also checks that both sides compute the same thing (the ``check`` column). Targets are reported, never tuned
for: ``met`` says whether the measured ratio reaches them on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from dataclasses import dataclass

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.workloads import (
    FULL,
    SMALL,
    FeatureWorkload,
    Shapes,
    basis_route,
    build_model,
    eval_unit_costs,
    eval_workload,
    fraction_curve,
    gradient_workload,
    max_relative_difference,
    measure_many,
    measure_pair,
    min_factor_cosine,
    mtil_eval_floor,
    mtil_eval_projection,
    principal_cosines,
    spectral_matrix,
    state_bytes,
    step_workload,
)

PARTS = ("grad", "features", "eval", "step", "basis", "fraction")
MIB = 2**20


@dataclass
class Row:
    comparison: str
    metric: str
    clbench: float
    reference: float
    unit: str
    target: str  # "<=0.8", ">=2" or "" (measured only)
    check: str  # what was verified to be the same
    note: str = ""
    clbench_cpu: float | None = None  # CPU seconds of this process, for time rows
    reference_cpu: float | None = None
    speedup: bool = False  # show reference / clbench (how many times faster) instead of the ratio

    @property
    def cpu_ratio(self) -> float | None:
        if self.clbench_cpu is None or not self.reference_cpu:
            return None
        return self.clbench_cpu / self.reference_cpu

    @property
    def ratio(self) -> float:
        return self.clbench / self.reference if self.reference else float("nan")

    @property
    def met(self) -> str:
        if not self.target:
            return ""
        bound = float(self.target[2:])
        value = self.reference / self.clbench if self.target.startswith(">=") else self.ratio
        ok = value >= bound if self.target.startswith(">=") else value <= bound
        return "yes" if ok else "NO"


def _mib(value: float) -> float:
    return value / MIB


# ---- the comparisons ----------------------------------------------------------------------------------------
def grad_rows(shapes: Shapes, device: str, repeats: int, console: Console, float64: bool = False) -> list[Row]:
    console.print(f"[dim]gradient estimation: {shapes.backbone}, {shapes.grad_batches} batches of "
                  f"{shapes.grad_batch}, {shapes.classes} classes[/dim]")
    work = gradient_workload(build_model(shapes.backbone, device), shapes.grad_batch, shapes.grad_batches,
                             shapes.classes, principal=shapes.principal, device=device)
    ours, ref = measure_pair(work.clbench, work.official, repeats, device=device)
    diff = max_relative_difference(ours.value, ref.value)
    cosine = min_factor_cosine(work.initial_factors(ours.value), work.initial_factors(ref.value))
    check = f"max rel. diff {diff:.1e}; A cosines >= {cosine:.4f}"
    if float64:  # how far each float32 estimate is from the float64 one (the scale of float32 rounding)
        exact = work.float64()
        check += (f"; vs float64: clbench {max_relative_difference(ours.value, exact):.1e}, official "
                  f"{max_relative_difference(ref.value, exact):.1e}")
    setting = f"B={shapes.grad_batch}, {shapes.grad_batches} batches"
    return [Row("grad_estimation", "time", ours.seconds, ref.seconds, "s", "<=0.8", check, setting,
                ours.cpu_seconds, ref.cpu_seconds),
            Row("grad_estimation", "peak memory", _mib(ours.peak_bytes), _mib(ref.peak_bytes), "MiB", "<=0.5",
                check, setting)]


def feature_rows(shapes: Shapes, device: str, repeats: int, console: Console) -> list[Row]:
    work = FeatureWorkload(shapes.feat_width, shapes.feat_tokens, shapes.feat_batch, shapes.feat_layers,
                           shapes.feat_batches, device=device)
    console.print(f"[dim]feature statistics: d={work.width}, L={work.tokens}, B={work.batch}, "
                  f"{work.layers} blocks, {work.batches} batches[/dim]")
    inputs = work.inputs()
    ours, ref = measure_pair(lambda: work.clbench(inputs), lambda: work.official(inputs), repeats, device=device)
    acc = ours.value[(0, "qkv")]
    stacked = torch.cat([x.reshape(-1, work.width) for x in inputs]).double()
    exact = bool(torch.allclose(acc.covariance(), stacked.T @ stacked, rtol=1e-9, atol=1e-6))
    check = f"covariance = Gram of all tokens: {exact}"
    setting = f"d={work.width}, L·B={work.tokens * work.batch}, {work.layers} blocks"
    return [Row("feature_stats", "peak memory", _mib(ours.peak_bytes), _mib(ref.peak_bytes), "MiB", "<=0.1",
                check, setting + " (state + per-batch transients)"),
            Row("feature_stats", "state held", _mib(state_bytes(ours.value)), _mib(state_bytes(ref.value)), "MiB",
                "", check, "2 float64 d×d per block vs 4 float32 d×(L·B)"),
            Row("feature_stats", "time", ours.seconds, ref.seconds, "s", "", check, setting, ours.cpu_seconds,
                ref.cpu_seconds)]


def eval_rows(shapes: Shapes, device: str, repeats: int, console: Console) -> list[Row]:
    console.print(f"[dim]evaluation: {shapes.eval_batches} batches of {shapes.eval_batch}, "
                  f"{shapes.eval_classes} classes[/dim]")
    work = eval_workload(build_model(shapes.backbone, device), shapes.eval_batch, shapes.eval_batches,
                         shapes.eval_classes, device=device)
    warmup = 1 if shapes.backbone == "tiny" else 0
    ours, ref = measure_pair(work.clbench, work.official, repeats, memory=False, device=device, warmup=warmup)
    check = f"same accuracy: {ours.value == ref.value}"
    setting = f"C={shapes.eval_classes}, {shapes.eval_batches} batches of {shapes.eval_batch}"
    rows = [Row("eval (one dataset)", "time", ours.seconds, ref.seconds, "s", "<=0.3", check, setting,
                ours.cpu_seconds, ref.cpu_seconds)]
    costs = eval_unit_costs(work, repeats)
    mine, official = mtil_eval_projection(costs)
    rows.append(Row("eval (all 11 MTIL test sets, projected)", "time", mine, official, "s", "<=0.3",
                    "unit costs measured here; MTIL test sizes and classes, batch 64",
                    f"per image {costs.image * 1e3:.1f} ms, per prompt {costs.prompt_full * 1e3:.1f} ms "
                    f"(full context) / {costs.prompt_clbench * 1e3:.1f} ms (cut)"))
    floor = mtil_eval_floor(costs)
    rows.append(Row("eval floor (MTIL, projected): image tower alone vs official", "time", floor, official, "s", "",
                    "same unit costs", "no evaluation that encodes each test image once can go below this ratio"))
    rows.append(Row("eval (MTIL, projected): clbench vs the image-tower floor", "time", mine, floor, "s", "",
                    "same unit costs", "what clbench adds to the unavoidable image work"))
    rows.append(Row("eval text encoding (MTIL, projected): once per dataset vs every batch", "time", mine - floor,
                    official - floor, "s", "", "same unit costs", "the part the two approaches differ in"))
    return rows


def step_rows(shapes: Shapes, device: str, repeats: int, console: Console) -> list[Row]:
    console.print(f"[dim]training step: batch {shapes.step_batch}[/dim]")
    model = build_model(shapes.backbone, device)
    works = {name: step_workload(model, name, shapes.step_batch, shapes.classes, principal=shapes.principal,
                                 device=device) for name in ("keeplora", "lora")}
    ours, ref = measure_pair(works["keeplora"].step, works["lora"].step, max(repeats, shapes.step_repeats),
                             memory=False, device=device, warmup=1)
    return [Row("train step", "time", ours.seconds, ref.seconds, "s", "<=1.05",
                "both start at the pretrained function (tests)", f"KeepLoRA vs LoRA, B={shapes.step_batch}",
                ours.cpu_seconds, ref.cpu_seconds)]


def basis_rows(shapes: Shapes, device: str, repeats: int, console: Console, thresholds: tuple[float, ...],
               routes: tuple[str, ...] = ("auto", "lowrank")) -> list[Row]:
    """Each clbench route against the official float32 SVD and clbench's float64 SVD. Every basis, the official
    one included, is checked against the float64 SVD's: same number of columns, principal-angle cosines
    >= 0.999 (the ``check`` column)."""
    rows = []
    for n in shapes.basis_sizes:
        W = spectral_matrix(n).to(device)
        for threshold in thresholds:
            console.print(f"[dim]principal basis {n}x{n}, eps={threshold}[/dim]")
            warmup = 1 if n <= 1024 else 0
            runs = repeats * 5 if n <= 1024 else repeats  # milliseconds to a second: more runs against noise
            names = [*routes, "official", "svd"]
            measured = dict(zip(names, measure_many(
                [lambda W=W, t=threshold, r=r: basis_route(W, t, r) for r in names], runs, memory=False,
                device=device, warmup=warmup), strict=True))
            exact = measured["svd"].value

            def same(basis: torch.Tensor, exact: torch.Tensor = exact) -> tuple[bool, str]:
                if basis.shape != exact.shape:
                    return False, f"p={basis.shape[1]} vs {exact.shape[1]} (DIFFERENT basis)"
                cosine = float(principal_cosines(basis, exact).min())
                return cosine >= 0.999, f"p={basis.shape[1]}, cos >= {cosine:.4f}"

            official_ok, official_check = same(measured["official"].value)
            for route in routes:
                ours = measured[route]
                ok, check = same(ours.value)
                for ref_name, label in (("official", "official fp32 svd"), ("svd", "float64 svd")):
                    ref = measured[ref_name]
                    valid = ok and (official_ok or ref_name == "svd")
                    note = "" if valid else "target void: not the same basis"
                    check_text = f"{check}; official {official_check}" if ref_name == "official" else check
                    rows.append(Row(f"principal basis {n}², eps={threshold}", f"{route} vs {label}", ours.seconds,
                                    ref.seconds, "s", ">=2" if valid else "", check_text, note, ours.cpu_seconds,
                                    ref.cpu_seconds, speedup=True))
    return rows


def fraction_table(shapes: Shapes, device: str, data: str, console: Console) -> tuple[Table, pd.DataFrame]:
    if data == "embedded":
        from clbench.datasets.synthetic import build_synthetic
        from clbench.models.backbones import load_backbone

        model = load_backbone("tiny", None, device)
        task = build_synthetic(1, model.image_spec, 64, 8, 0, num_tasks=1).tasks[0]
        work = gradient_workload(model, 64, 0, 0, device=device, task=task)
        label = f"embedded default: pretrained tiny, task {task.name}"
    else:
        work = gradient_workload(build_model(shapes.backbone, device), shapes.grad_batch, shapes.fraction_batches,
                                 shapes.classes, principal=shapes.principal, device=device)
        label = f"random data, {shapes.backbone} (random weights)"
    console.print(f"[dim]gradient on a fraction of the batches: {label}[/dim]")
    points = fraction_curve(work, device=device)
    frame = pd.DataFrame([dataclasses.asdict(p) for p in points])
    table = Table(title=f"KeepLoRA S1 on a fraction of the batches ({label})",
                  caption="agreement: principal-angle cosines of A (top-r of the projected gradient) vs the full "
                          "pass, mean over the r angles; mean and min over the adapted matrices")
    for col in ("fraction", "batches", "seconds", "time vs full", "mean cosine", "min cosine"):
        table.add_column(col, justify="right")
    full = points[0].seconds
    for p in points:
        table.add_row(f"{p.fraction:g}", str(p.batches), f"{p.seconds:.3f}", f"{p.seconds / full:.2f}x",
                      f"{p.mean_cosine:.4f}", f"{p.min_cosine:.4f}")
    return table, frame


# ---- output ----------------------------------------------------------------------------------------------------
def ratio_table(rows: list[Row], title: str) -> Table:
    table = Table(title=title, caption="ratio = clbench / reference (for '>=' targets: reference / clbench, the "
                                       "speed-up); times: fastest of interleaved runs, wall clock (CPU time of "
                                       "this process beside it); memory: peak of the tensors each side creates")
    for col in ("comparison", "metric", "clbench", "reference", "ratio", "CPU-time ratio", "target", "met",
                "check", "setting"):
        table.add_column(col, justify="right" if col in ("clbench", "reference", "ratio", "CPU-time ratio")
                         else "left")
    for r in rows:
        speedup = r.speedup
        ratio = f"{1 / r.ratio:.2f}x" if speedup else f"{r.ratio:.3f}"
        cpu = r.cpu_ratio
        cpu_text = "" if cpu is None else (f"{1 / cpu:.2f}x" if speedup else f"{cpu:.3f}")
        table.add_row(r.comparison, r.metric, f"{r.clbench:.3f} {r.unit}", f"{r.reference:.3f} {r.unit}", ratio,
                      cpu_text, r.target, r.met, r.check, r.note)
    return table


def machine_line(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    line = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu})"
    if device.startswith("cuda"):
        line += f", GPU {torch.cuda.get_device_name(device)}"
    if hasattr(os, "getloadavg"):
        line += f", load average {os.getloadavg()[0]:.1f}"
    return line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ratios", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="ViT-B-16 shapes (default: tiny backbone)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per side (default 3 small, 1 full)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: leave as is)")
    for name in ("grad_batch", "grad_batches", "classes", "eval_batch", "eval_batches", "eval_classes",
                 "feat_batch", "feat_layers", "feat_batches", "step_batch", "fraction_batches"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="override the shape")
    parser.add_argument("--basis-sizes", default=None, help="comma-separated n of the n×n bases")
    parser.add_argument("--basis-thresholds", default="0.85,0.2", help="energy thresholds (vision 0.85, text 0.2)")
    parser.add_argument("--basis-routes", default="auto,lowrank",
                        help="clbench routes compared with the official float32 svd and the float64 svd "
                             "(of svd, gram_eigh, lowrank, mixed, auto; KeepLoRA uses auto)")
    parser.add_argument("--grad-float64", action="store_true",
                        help="also run the gradient pass in float64 and report each side's distance to it")
    parser.add_argument("--principal", choices=("on", "off"), default=None,
                        help="run KeepLoRA's S0 SVDs in the gradient workloads (default: on small, off full)")
    parser.add_argument("--fraction-data", choices=("random", "embedded"), default="random",
                        help="fraction curve on random data, or on the embedded default (pretrained tiny, "
                             "first synthetic task; pretrains the tiny backbone if it is not cached)")
    parser.add_argument("--out", default=None, help="write the rows to this CSV (fraction curve: *_fraction.csv)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 220)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = FULL if args.full else SMALL
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(Shapes)}
                 and v is not None}
    if args.basis_sizes:
        overrides["basis_sizes"] = tuple(int(x) for x in args.basis_sizes.split(","))
    if args.principal:
        overrides["principal"] = args.principal == "on"
    shapes = dataclasses.replace(shapes, **overrides)
    repeats = args.repeats or (3 if shapes.backbone == "tiny" else 1)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        console.print(f"error: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
        return 2
    console.print(f"[bold]{shapes.label}[/bold] on {args.device}: {machine_line(args.device)}", highlight=False)
    rows: list[Row] = []
    if "grad" in parts:
        rows += grad_rows(shapes, args.device, repeats, console, args.grad_float64)
    if "features" in parts:
        rows += feature_rows(shapes, args.device, repeats, console)
    if "eval" in parts:
        rows += eval_rows(shapes, args.device, repeats, console)
    if "step" in parts:
        rows += step_rows(shapes, args.device, repeats, console)
    if "basis" in parts:
        thresholds = tuple(float(x) for x in args.basis_thresholds.split(","))
        routes = tuple(r.strip() for r in args.basis_routes.split(",") if r.strip())
        rows += basis_rows(shapes, args.device, repeats, console, thresholds, routes)
    if rows:
        console.print(ratio_table(rows, f"clbench vs official-style, {shapes.label}, {args.device}"))
    fraction = None
    if "fraction" in parts:
        table, fraction = fraction_table(shapes, args.device, args.fraction_data, console)
        console.print(table)
    if args.out:
        frame = pd.DataFrame([{**dataclasses.asdict(r), "ratio": r.ratio, "cpu_ratio": r.cpu_ratio, "met": r.met,
                               "shapes": shapes.label, "device": args.device} for r in rows])
        frame.to_csv(args.out, index=False)
        if fraction is not None:
            fraction.to_csv(args.out.removesuffix(".csv") + "_fraction.csv", index=False)
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
