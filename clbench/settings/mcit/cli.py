"""Command-line pieces of the MCIT setting, called from the shared commands (data check, run, methods, profile)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from clbench.cli.consoles import make_console
from clbench.errors import UserError
from clbench.settings.mcit.bench import MCIT_BENCHMARKS
from clbench.settings.mcit.data import BENCHMARKS, inspect


def data_check(root: Path, benchmark: str) -> None:
    """Print a table of the benchmark's tasks under ``root``; one-line error (exit 2) if any task is unusable."""
    rows = inspect(root, benchmark)
    table = Table(title=f"{benchmark} tasks under {root}")
    for col in ("task", "status", "train", "test", "files / problem"):
        table.add_column(col, justify="right" if col in ("train", "test") else "left", overflow="fold")
    for task, row in zip(BENCHMARKS[benchmark], rows, strict=True):
        counts = ["-" if v is None else f"{v:,}" for v in (row.n_train, row.n_test)]
        where = ", ".join(str(p.relative_to(root)) for p in task.paths(root).values())
        table.add_row(row.name, "[green]ok[/green]" if row.usable else "[red]unusable[/red]", *counts,
                      where if row.usable else row.problem)
    Console().print(table)
    bad = [r for r in rows if not r.usable]
    if bad:
        raise UserError(f"{len(bad)} of {len(rows)} {benchmark} tasks unusable under {root}; first: {bad[0].problem}")


def print_mcit_methods(console: Console) -> None:
    """The methods of the MCIT setting, one line each (``clbench methods``)."""
    from clbench.settings.mcit.methods import get_mcit_method, list_mcit_methods

    console.print(f"MCIT setting, LLaVA (--benchmark {', '.join(MCIT_BENCHMARKS)}):", highlight=False)
    for name in list_mcit_methods():
        console.print(f"  {name:12s} {get_mcit_method(name).summary}", highlight=False)


def print_mcit_card(console: Console, name: str, preset: str) -> None:
    """``clbench methods NAME --setting mcit``: the LLaVA form's hyperparameters and the preset's loop settings."""
    import dataclasses

    from clbench.config import load_preset
    from clbench.settings.mcit.loop import LoopConfig
    from clbench.settings.mcit.methods import get_mcit_method
    from clbench.settings.mcit.runner import PRESETS, SETTING

    cls = get_mcit_method(name)
    load_preset(preset, "mcit", SETTING)  # an unknown preset: one line
    console.print(f"{name}, MCIT setting: {cls.summary}", highlight=False)
    console.print(f"official setting: {' '.join((cls.Hparams.__doc__ or '').split())}", highlight=False)
    hp = cls.Hparams()
    table = Table(title=f"hyperparameters (--set {name}.KEY=VALUE)")
    for col in ("name", "type", "default"):
        table.add_column(col)
    for f in dataclasses.fields(hp):
        table.add_row(f.name, type(getattr(hp, f.name)).__name__, str(getattr(hp, f.name)))
    console.print(table)
    p = PRESETS[preset]
    loop = LoopConfig(**p["loop"])
    table = Table(title=f"shared loop, --preset {preset}")
    for col in ("setting", "value"):
        table.add_column(col)
    for f in dataclasses.fields(loop):
        table.add_row(f"loop.{f.name}", str(getattr(loop, f.name)))
    for key in ("n_train", "n_test"):
        table.add_row(f"data.{key}", f"{p[key]} (synthetic-mcit only)")
    table.add_row("pretrain_steps", f"{p['pretrain_steps']} (tiny LLaVA)")
    console.print(table)


def run_command(benchmark: str, methods: list[str], out: Path, seed: int, preset: str, backbone: str,
                data_root: str, device: str, sets: list[str], quiet: bool, resume: bool = False,
                track: str = "") -> None:
    """``clbench run`` on an MCIT benchmark: run (logged to the ``--track`` backends), print the metric table (the
    options it refuses, and its extra, are checked before by the setting's declaration,
    :mod:`clbench.settings.mcit.setting`)."""
    from clbench.costs.profiler import summarise_profile
    from clbench.engine.interrupt import handling_signals
    from clbench.settings.mcit.metrics import LABELS, ORDER
    from clbench.settings.mcit.runner import run_mcit

    console = Console(stderr=True)

    def on_task(method: str, t: int, name: str, row: list[float]) -> None:
        if not quiet:
            cells = " ".join(f"{v:5.1f}" for v in row)
            console.print(f"{method}: after task {t + 1} ({name}): {cells}", highlight=False)

    tracker = None
    if track.strip():
        from clbench.engine.tracking import Tracker, parse_backends
        from clbench.storage.results import run_dir

        config = {"setting": "mcit", "benchmark": benchmark, "seed": seed, "preset": preset, "backbone": backbone,
                  "sets": list(sets)}
        tracker = Tracker(parse_backends(track), out, lambda m: run_dir(out, benchmark, 1, m, seed), config)
    try:
        with handling_signals():  # SIGTERM / SIGINT stop after a safe point; the run is marked interrupted
            outcomes = run_mcit(benchmark, methods, out, seed, preset, backbone, data_root, device, sets,
                                notify=lambda msg: console.print(f"note: {msg}", highlight=False, soft_wrap=True),
                                on_task=on_task, resume=resume, tracker=tracker)
    finally:
        if tracker is not None:
            tracker.finish()
    table = Table(title=f"{benchmark}: MCITlib metrics (percent; caption tasks: caption average)")
    for col in ("method", *(LABELS[k] for k in ORDER), "minutes", "results"):
        table.add_column(col, justify="left" if col in ("method", "results") else "right")
    for o in outcomes:
        table.add_row(o.method, *(f"{o.metrics[k]:.1f}" for k in ORDER), f"{o.seconds / 60:.1f}", str(o.path))
    Console().print(table)
    if not quiet:
        for o in outcomes:
            Console().print(summarise_profile(pd.read_csv(o.path / "profile.csv"), title=f"{o.method}: cost per "
                                              "section"))


def profile_command(backbone: str, methods: list[str], sets: list[str], seed: int, device: str,
                    out: Path | None, layers: int | None = None, svd_max_dim: int | None = None) -> None:
    """``clbench profile --backbone llava-...``: keeplora's gradient pass and SVD sections at the real shapes,
    measured on ``layers`` built layers and extrapolated to the whole model (the output says which is which)."""
    import torch

    from clbench.config import set_field
    from clbench.extras import require_extra

    require_extra("mcit", f"--backbone {backbone} (the LLaVA setting)")

    from clbench.settings.mcit.costs import SHAPES, TEXT_TOKENS, profile_llava
    from clbench.settings.mcit.methods import get_mcit_method
    from clbench.storage.results import atomic_write_csv

    for m in methods:
        get_mcit_method(m)
    if "keeplora" not in methods:
        raise UserError("on a LLaVA backbone, clbench profile measures keeplora's gradient pass and SVD sections "
                        "(lora has neither); add keeplora to --methods")
    if out is not None and (out.is_dir() or out.suffix.lower() != ".csv"):
        raise UserError(f"--out {out}: give a file name ending in .csv")
    hp = get_mcit_method("keeplora").Hparams()
    for item in sets:
        key, _, raw = item.partition("=")
        if key not in ("keeplora.rank", "keeplora.eps_w", "keeplora.energy") or not raw:
            raise UserError(f"--set {item!r}: on a LLaVA backbone use keeplora.rank, keeplora.eps_w or "
                            "keeplora.energy")
        set_field(hp, [key.split(".")[1]], raw.strip(), key)  # typed and range-checked, as every --set
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    layers = 1 if layers is None else layers
    costs = profile_llava(backbone, layers, hp.rank, hp.eps_w, hp.energy, seed, dev,
                          4096 if svd_max_dim is None else svd_max_dim)
    shape = SHAPES[backbone]
    table = Table(title=f"keeplora (LLaVA form) on {backbone} shapes, random weights, rank {hp.rank}, {dev}, "
                  f"{torch.get_num_threads()} threads; one item = {shape.image_tokens} image + {TEXT_TOKENS} text "
                  "tokens")
    for col in ("section", "part", "d_out x d_in", "count", "s each", "s total", "how"):
        table.add_column(col, justify="right" if col in ("count", "s each", "s total") else "left",
                         no_wrap=col in ("section", "d_out x d_in"))
    for c in costs:
        table.add_row(c.section, c.part, f"{c.d_out} x {c.d_in}", str(c.count), f"{c.seconds:.3g}", f"{c.total:.3g}",
                      c.how)
    console = make_console()
    console.print(table)
    total = {s: sum(c.total for c in costs if c.section == s)
             for s in ("grad_estimation", "pretrained_svd", "grad_svd", "feature_svd")}
    share = 8000  # 20 % of a 40k-item UCIT task (ArxivQA, CLEVR-Math, Flickr30k train_*_4w.json)
    grad_gib = sum(4 * c.d_out * c.d_in * c.count for c in costs if c.section == "grad_svd") / 2**30
    extrapolated = sorted({c.part for c in costs if c.how.startswith("EXTRAPOLATED")})
    console.print(
        f"whole model, extrapolated from {layers} built decoder layer(s) to {shape.layers} (and vision layers to "
        f"{shape.vision_layers}): grad_estimation {total['grad_estimation']:.1f} s per training item, so about "
        f"{total['grad_estimation'] * share / 3600:.1f} h for the 20 % share of a 40k-item UCIT task ({share} "
        f"items), and as much again for feature_stats; pretrained_svd {total['pretrained_svd']:.0f} s once; "
        f"grad_svd {total['grad_svd']:.0f} s and feature_svd {total['feature_svd']:.0f} s per task; fp32 gradient "
        f"of all adapted weights {grad_gib:.2f} GiB"
        + (f"; the SVD sections of {', '.join(extrapolated)} are extrapolated, not measured (--svd-max-dim "
           f"{max(shape.hidden, shape.intermediate)} measures them)" if extrapolated else ""), highlight=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(out, pd.DataFrame([{**c.__dict__, "total_seconds": c.total} for c in costs]))

