"""The CLIP setting's parts of the shared commands: ``run`` (progress, tracking, summary), ``sweep``'s plan,
``methods``' card, ``data check``'s table; called through :class:`clbench.settings.clip.ClipSetting`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from clbench.errors import UserError
from clbench.settings.base import RunOptions, SweepOptions, SweepPlan

SWEEP_COLUMNS = [("Transfer", "transfer"), ("Average", "average"), ("Last", "last")]


def run(options: RunOptions, console, out_console) -> None:
    """``clbench run`` on a CLIP benchmark: resolve the configuration, run under the progress view (and the
    tracker of ``--track``), print the summary and the costs; exit status 1 when a run failed."""
    from clbench.config import build_config
    from clbench.engine.progress import RunProgress
    from clbench.engine.runner import run_methods

    o = options
    names = o.methods
    run_options = {"order": o.order, "benchmark": o.benchmark, "seed": o.seed, "backbone": o.backbone,
                   "pretrained": o.pretrained or None, "data_root": o.data_root or None, "device": o.device,
                   "precision": o.precision or None, "eval": o.eval or None}
    data_options = {"shots": o.shots, "skip_bad_images": True if o.skip_bad_images else None,
                    "datasets": o.datasets or None, "allow_incomplete": True if o.allow_incomplete else None}
    cfg = build_config(o.preset, run_options, o.sets, names, data_options)
    tracker = tracker_for(o.track, cfg, o.out)
    with RunProgress(quiet=o.quiet, console=console, methods=names) as progress:
        hooks_for = progress.hooks_for if tracker is None else (
            lambda method: tracker.hooks_for(method, progress.hooks_for(method)))
        try:
            outcomes = run_methods(cfg, names, o.out, hooks_for=hooks_for,
                                   on_pretrain_step=progress.pretrain_step, resume=o.resume,
                                   allow_torchscript=o.trust_torchscript, allow_download=o.allow_download,
                                   notify=lambda msg: console.print(f"note: {msg}", highlight=False, soft_wrap=True))
        finally:
            if tracker is not None:
                tracker.finish()
    print_summary(outcomes, out_console)
    if not o.quiet:
        print_costs(outcomes, out_console)
    if any(outcome.status != "complete" for outcome in outcomes):
        for outcome in outcomes:
            if outcome.error:
                console.print(f"[red]{outcome.method} failed:[/red] {outcome.error}", highlight=False,
                              soft_wrap=True)
        raise typer.Exit(1)


def tracker_for(track: str, cfg, out: Path):
    """The experiment tracker ``--track`` asks for, or ``None``; unknown or missing backends fail here, first."""
    if not track.strip():
        return None
    import dataclasses

    from clbench.engine.tracking import Tracker, parse_backends
    from clbench.storage.results import run_dir

    backends = parse_backends(track)
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return Tracker(backends, out, lambda m: run_dir(out, cfg.benchmark, cfg.order, m, cfg.seed, eval_rule=cfg.eval,
                                                      datasets=cfg.data.datasets),
                   config)


def print_costs(outcomes, out_console) -> None:
    import pandas as pd

    from clbench.costs.profiler import summarise_profile

    for o in outcomes:
        profile = o.path / "profile.csv"
        if profile.is_file():
            out_console.print(summarise_profile(pd.read_csv(profile), title=f"{o.method}: cost per section"))


def print_summary(outcomes, out_console) -> None:
    """Transfer / Average / Last / BWT of every run (and the union rule's recall), undefined values explained."""
    from clbench.engine.metrics import undefined_text

    union = any((o.metrics or {}).get("eval") == "union" for o in outcomes)
    rule = "union label space" if union else "per-task label space"
    table = Table(title=f"Transfer / Average / Last (percent, {rule})")
    columns = ("method", "Transfer", "Average", "Last", "BWT", *(("recall (last)",) if union else ()), "results")
    for col in columns:
        table.add_column(col, justify="left" if col in ("method", "results") else "right",
                         overflow="fold" if col == "results" else "ellipsis")  # a path is never cut to "…"
    reasons: dict[str, str] = {}
    for o in outcomes:
        m = o.metrics or {}
        cells = []
        for k in ("transfer", "average", "last", "bwt"):
            reason = undefined_text(m, k) if k in m else None
            if reason:
                reasons.setdefault(k, reason)
            cells.append("-" if k not in m else "undefined" if reason else f"{m[k]:.1f}")
        if union:
            recall = m.get("selection_recall", {}).get("last")
            cells.append("-" if recall is None else f"{recall:.1f}")
        table.add_row(o.method, *cells, str(o.path))
    out_console.print(table)
    for key, reason in reasons.items():
        out_console.print(f"{key.capitalize() if key != 'bwt' else 'BWT'} undefined: {reason}", highlight=False,
                          soft_wrap=True)


def print_card(console, name: str, preset: str, order: int) -> None:
    """``clbench methods NAME``: the hyperparameters and the recipe under ``preset`` (order ``order``)."""
    from clbench.config import build_config, recipe_rows
    from clbench.methods import get_method
    from clbench.methods.recipes import card_for, hparam_rows

    cls = get_method(name)
    cfg = build_config(preset, {"order": order}, [], [name])
    card = card_for(name)
    console.print(f"{name}: {cls.summary}", highlight=False)
    if card is not None:
        console.print(f"follows: {card.reference}", highlight=False)
    rows = hparam_rows(name)
    if rows:
        table = Table(title=f"hyperparameters (--set {name}.KEY=VALUE)")
        for col in ("name", "type", "default", "allowed"):
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        console.print("hyperparameters: none")
    if card is None:
        console.print(f"recipe: {name} declares no recipe card")
        return
    if not card.trains:
        console.print("recipe: no training, so no training settings apply")
    table = Table(title=f"recipe under --preset {preset} (order {order}); the authors' is --preset {card.preset}")
    for col in ("setting", "value", "source", "note"):
        table.add_column(col, overflow="fold")
    for row in recipe_rows(cfg, name):
        table.add_row(row.key, str(row.value), row.source, row.note)
    if table.row_count:
        console.print(table)


def plan_sweep(options: SweepOptions, console) -> SweepPlan:
    """Every run of a CLIP sweep (:func:`clbench.sweeps.plan.expand`), checked before any runs."""
    from clbench.config import check_real_data_options, data_assignments
    from clbench.storage.safeio import check_path
    from clbench.sweeps.plan import SweepRequest, check_sets, expand, int_list, parse_grid

    o = options
    axes = parse_grid(o.grid, o.methods)
    check_real_data_options(o.benchmark, o.shots, o.skip_bad_images, o.data_root)
    if o.datasets.strip():  # the same for every run: an unknown name is one line, not a sweep of invalid runs
        from clbench.datasets.sequence import canonical_selection

        canonical_selection(o.benchmark, o.datasets)
    sets = [*data_assignments(o.shots, o.skip_bad_images, o.datasets, o.allow_incomplete), *o.sets]
    check_sets(sets, o.methods, axes)
    run_options = {"benchmark": o.benchmark, "backbone": o.backbone, "pretrained": o.pretrained or None,
                   "data_root": o.data_root or None, "device": o.device, "precision": o.precision or None,
                   "eval": o.eval or None}
    request = SweepRequest(tuple(o.methods), int_list(o.orders, "--orders"), int_list(o.seeds, "--seeds"), axes,
                           o.preset, tuple(run_options.items()), tuple(sets), str(check_path(o.out, "--out").resolve()),
                           o.cpus_per_job)
    return SweepPlan(expand(request), Path(request.out),
                     lambda: prepare_backbone(o.backbone, o.pretrained, o.quiet, console), SWEEP_COLUMNS)


def prepare_backbone(backbone: str, pretrained: str, quiet: bool, console) -> None:
    """Pretrain the embedded tiny backbone once here, so parallel runs do not each pretrain it."""
    if backbone != "tiny" or pretrained not in ("", "embedded"):
        return
    from clbench.engine.progress import RunProgress
    from clbench.models.backbones import ensure_tiny_weights, tiny_weights_ready

    if not tiny_weights_ready():
        with RunProgress(quiet=quiet, console=console) as progress:
            ensure_tiny_weights(on_step=progress.pretrain_step)


def data_check(data_root: str, benchmark: str, allow_incomplete: bool, console) -> None:
    """``clbench data check`` on MTIL or X-TAIL: one row per dataset (found, counts, classes, what is missing)."""
    from clbench.datasets.mtil import resolve_data_root

    if benchmark == "mtil":
        from clbench.datasets.mtil import inspect_mtil, unusable_line

        def inspect(root):
            return inspect_mtil(root, allow_incomplete=allow_incomplete)
    elif benchmark == "xtail":
        from clbench.datasets.xtail import inspect_xtail as inspect
        from clbench.datasets.xtail import unusable_line
    else:
        raise ValueError(f"no data check for {benchmark!r}")
    root = resolve_data_root(data_root, benchmark)
    statuses = inspect(root)
    table = Table(title=f"{'MTIL' if benchmark == 'mtil' else 'X-TAIL'} datasets under {root}")
    for col in ("dataset", "status", "train", "test", "classes", "folder / missing path"):
        table.add_column(col, justify="right" if col in ("train", "test", "classes") else "left", overflow="fold")
    for s in statuses:
        if s.usable:
            status, where = "[green]ok[/green]", s.path.name
        else:
            short = s.n_classes is not None and s.n_classes != s.expected_classes
            status = "[red]missing[/red]" if s.missing == s.path else "[red]incomplete[/red]" \
                if s.missing or short else "[red]unreadable[/red]"
            where = str(s.missing or s.path)
        classes = "-" if s.n_classes is None else str(s.n_classes)
        if s.n_classes is not None and s.n_classes != s.expected_classes:
            classes += f" (full: {s.expected_classes})"
        counts = ["-" if v is None else f"{v:,}" for v in (s.n_train, s.n_test)]
        table.add_row(s.name, status, *counts, classes, where)
    console.print(table)
    bad = [(s.name, s.missing, s.problem) for s in statuses if not s.usable]
    if bad:
        raise UserError(unusable_line(root, bad, len(statuses)))
