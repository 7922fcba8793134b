"""``clbench report`` on MCIT (LLaVA) results: one row per method, MCITlib's columns, best bold.

Columns, as MCITlib and HiDe-LLaVA lay out their tables (Guo et al., arXiv 2508.07307): the final score of every
task (the last row of the T x T matrix, in training order), then MFT, MFN, MAA and BWT, then the MTIL-style
Transfer (upper triangle, which clbench evaluates). Rows with several seeds show mean ± sample std. Every run
folder is checked as for CLIP (complete status, square matrix, ``metrics.json`` equal to what its own matrix
gives); runs of CLIP and MCIT never share a table. Figures: the full T x T matrix of every run, the base model's
scores as its first row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from clbench.engine.metrics import matrix_from_frame
from clbench.errors import UserError
from clbench.reports.latex import LatexLayout, set_table, std_format
from clbench.reports.loading import (
    METRIC_TOLERANCE,
    PROFILE_COLUMNS,
    RUN,
    Matrix,
    ReportInput,
    _optional_csv,
    _read_json,
    register_setting_report,
)
from clbench.reports.names import method_display
from clbench.reports.tables import BEST, SECOND, booktabs_rules, displayed, latex_escape
from clbench.settings.mcit.metrics import LABELS, ORDER, mcit_metrics
from clbench.storage.results import read_accuracy_csv, safe_component

MCIT = "mcit"
COLUMNS = ["method", "seeds", "column", "kind", "mean", "std", "emphasis"]


def read_mcit_run(folder: Path, manifest: dict) -> Matrix:
    """One complete MCIT run folder, checked; its ``metrics.json`` must equal what its matrix gives."""
    path = folder / "accuracy.csv"
    if not path.exists():
        raise UserError(f"{folder}: complete run without accuracy.csv; rerun it or remove the folder")
    try:
        values, tasks = matrix_from_frame(read_accuracy_csv(path), str(path))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a usable score matrix ({exc})") from None
    if values.shape != (len(tasks), len(tasks)) or not np.isfinite(values).all():
        raise UserError(f"{path} must be a complete T x T matrix (every task scored after every task); rerun it")
    expected = mcit_metrics(values, tasks)
    metrics = _read_json(folder / "metrics.json") if (folder / "metrics.json").exists() else None
    if metrics is None:
        raise UserError(f"{folder}: complete run without metrics.json; rerun it or remove the folder")
    for key in ORDER:
        got = metrics.get(key)
        want = expected[key]
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise UserError(f"{folder / 'metrics.json'} is corrupt (bad or missing {key}); rerun that run")
        if not (math.isnan(got) and math.isnan(want)) and not abs(got - want) <= METRIC_TOLERANCE:
            raise UserError(f"{folder / 'metrics.json'} disagrees with its accuracy.csv ({LABELS[key]}: {got:.2f} "
                            f"vs {want:.2f}); the run's files are inconsistent, rerun it or remove its folder")
    base = None
    frame = _optional_csv(folder / "base.csv", tuple(tasks))  # the base model's scores, one row
    if frame is not None:
        if len(frame) != 1:
            raise UserError(f"{folder / 'base.csv'} needs one row with a column per task of accuracy.csv")
        base = frame.iloc[0][tasks].astype(float)
    method, seed = manifest.get("method"), manifest.get("seed")
    if not isinstance(method, str) or not method or not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{folder / 'manifest.json'}: method or seed missing or malformed; rerun that run")
    benchmark = safe_component(str(manifest.get("benchmark", "")), f"{folder / 'manifest.json'}: benchmark")
    config = {"benchmark": benchmark, "preset": manifest.get("preset"), "loop": manifest.get("loop"),
              "backbone": manifest.get("backbone"), "hparams": manifest.get("hparams")}
    accuracy = pd.DataFrame(values, index=pd.Index(tasks, name="trained_on"), columns=tasks)
    grid = folder.parent.name.partition(",")[2]  # a sweep's grid point: keeplora,rank=4 -> "rank=4"
    label = method_display(method) + (f" ({grid.replace(',', ', ')})" if grid else "")
    return Matrix(label=label, source=RUN, path=folder, seed=seed, datasets=tasks,
                  accuracy=accuracy, metrics=expected, method=method, zeroshot=base,
                  profile=_optional_csv(folder / "profile.csv", PROFILE_COLUMNS), config=config)


def collect_mcit(paths: list[Path]) -> ReportInput:
    """Every complete MCIT run below ``paths``, checked to form one table (one benchmark, one setup)."""
    warnings, runs = [], []
    for path in paths:
        for manifest_path in sorted(Path(path).rglob("manifest.json")):
            manifest = _read_json(manifest_path)
            if manifest.get("status") != "complete":
                warnings.append(f"skipping {manifest_path.parent}: status {manifest.get('status')!r}, not complete")
                continue
            runs.append(read_mcit_run(manifest_path.parent, manifest))
    if not runs:
        raise UserError(f"no complete MCIT runs in {', '.join(map(str, paths))}; finish them with clbench run --resume")
    _check_one_table(runs)
    first = runs[0]
    return ReportInput(first.config["benchmark"], None, first.datasets, runs, warnings, None,
                       first.config["preset"])


def _check_one_table(runs: list[Matrix]) -> None:
    """One benchmark, one task list, one shared setup; one method's seeds share their hyperparameters."""
    first = runs[0]
    for m in runs[1:]:  # a sweep over loop.* puts its grid point in the label, so loop may differ then
        for key in ("benchmark", "preset", "backbone", *(() if "," in m.path.parent.name else ("loop",))):
            if m.config[key] != first.config[key]:
                raise UserError(f"{m.path} and {first.path} differ in {key} ({json.dumps(m.config[key])} vs "
                                f"{json.dumps(first.config[key])}); one table holds one setup, so report them apart")
        if m.datasets != first.datasets:
            raise UserError(f"{m.path} and {first.path} train different task lists; report them apart")
    seen: dict[tuple[str, int], Matrix] = {}
    hparams: dict[str, Matrix] = {}
    for m in runs:  # one row per label: a method, or a method at a sweep's grid point
        if (m.label, m.seed) in seen:
            raise UserError(f"two complete runs of {m.label} seed {m.seed}: {seen[m.label, m.seed].path} and "
                            f"{m.path}; pass only one of them")
        seen[m.label, m.seed] = m
        other = hparams.setdefault(m.label, m)
        if other.config["hparams"] != m.config["hparams"]:
            raise UserError(f"runs of {m.label} with different hyperparameters ({other.path}, {m.path}); their "
                            "seeds cannot pool, so report them apart")


def score_frame(inp: ReportInput) -> pd.DataFrame:
    """The long frame behind every rendering: per method and column (each task's final score, then MFT, MFN,
    MAA, BWT, Transfer) the mean and sample std over seeds, and the emphasis (best bold, second underlined)."""
    rows = []
    for label, matrices in inp.groups().items():
        per_seed = pd.DataFrame([{**{t: float(m.accuracy.iloc[-1][t]) for t in inp.datasets},
                                  **{LABELS[k]: float(m.metrics[k]) for k in ORDER}} for m in matrices])
        n = len(matrices)
        for column in per_seed.columns:
            rows.append({"method": label, "seeds": n, "column": column,
                         "kind": "final score" if column in inp.datasets else "metric",
                         "mean": per_seed[column].mean(), "std": per_seed[column].std(ddof=1) if n > 1 else np.nan})
    frame = pd.DataFrame(rows, columns=COLUMNS[:-1])
    frame["emphasis"] = ""
    for _, cells in frame.groupby("column", sort=False):
        shown = cells["mean"].dropna().map(displayed)
        distinct = sorted(set(shown), reverse=True)  # higher is better in every column, BWT included
        if len(shown) >= 2:
            frame.loc[shown.index[shown == distinct[0]], "emphasis"] = BEST
        if len(shown) >= 3 and len(distinct) >= 2:
            frame.loc[shown.index[shown == distinct[1]], "emphasis"] = SECOND
    return frame[COLUMNS]


def _wide(frame: pd.DataFrame, pm: str, close: str, na: str, marks: dict[str, str]) -> pd.DataFrame:
    def cell(row) -> str:
        if math.isnan(row["mean"]):
            return na
        text = f"{row['mean']:.1f}" + ("" if math.isnan(row["std"]) else f"{pm}{row['std']:.1f}{close}")
        return marks[row["emphasis"]].format(text)

    labelled = frame.assign(label=[f"{m} ({n} seed{'s' if n != 1 else ''})"
                                   for m, n in zip(frame["method"], frame["seeds"], strict=True)],
                            text=frame.apply(cell, axis=1))
    table = labelled.pivot(index="label", columns="column", values="text")
    table = table.reindex(index=list(dict.fromkeys(labelled["label"])), columns=list(dict.fromkeys(frame["column"])))
    table.index.name = table.columns.name = None
    return table


def caption(inp: ReportInput, fmt: str) -> str:
    esc = latex_escape if fmt == "latex" else str
    pm, pct = (r"$\pm$", r"\%") if fmt == "latex" else ("±", "%")
    preset = f", preset {inp.preset}" if inp.preset else ""
    return (f"{esc(inp.benchmark)}{esc(preset)}: final score ({pct}) of every task after the last one, then MCITlib's "
            f"MFT (mean fine-tune), MFN (mean final), MAA (mean average accuracy), BWT (backward transfer) and "
            f"the MTIL-style Transfer (mean score of tasks before they are trained). Caption tasks score the mean "
            f"of their caption metrics. Rows with several seeds show mean {pm} sample std. Best per column in "
            f"bold, second underlined.")


def render_table(frame: pd.DataFrame, inp: ReportInput, fmt: str, layout: LatexLayout) -> str:
    """The table as ``csv`` (the long frame), ``markdown`` or ``latex`` (booktabs)."""
    if fmt == "csv":
        return frame.to_csv(index=False, float_format="%.4f", lineterminator="\n")
    if fmt == "markdown":
        table = _wide(frame, " ± ", "", "–", {BEST: "**{}**", SECOND: "<ins>{}</ins>", "": "{}"})
        lines = ["| Method | " + " | ".join(map(str, table.columns)) + " |",
                 "| :-- | " + " | ".join(["--:"] * table.shape[1]) + " |"]
        lines += [f"| {label} | " + " | ".join(row) + " |" for label, row in zip(table.index, table.to_numpy(),
                                                                                  strict=True)]
        return "\n".join(lines) + "\n\n" + caption(inp, fmt) + "\n"
    before, after = std_format(layout)
    table = _wide(frame, before, after, "--", {BEST: r"\textbf{{{}}}", SECOND: r"\underline{{{}}}", "": "{}"})
    table.index = [latex_escape(i) for i in table.index]
    table.columns = [latex_escape(c) for c in table.columns]
    tex = table.style.to_latex(column_format="l" + "r" * table.shape[1], hrules=True, caption=caption(inp, fmt),
                               label=f"tab:{inp.benchmark}", position="t", position_float="centering")
    return set_table(booktabs_rules(tex), layout)


def build_mcit_report(paths: list[Path], fmt: str, figures: bool, costs: bool, layout: LatexLayout):
    """Every output of ``clbench report`` on MCIT runs, rendered but not written."""
    from clbench.reports import costs as cost_table
    from clbench.reports.report import FORMATS, Report

    inp = collect_mcit(paths)
    report = Report(warnings=list(inp.warnings))
    stem = inp.benchmark
    report.files[stem + FORMATS[fmt]] = render_table(score_frame(inp), inp, fmt, layout)
    if costs:
        frame = cost_table.cost_frame(inp)
        if not len(frame):
            raise UserError("--costs: no run in the input has a profile.csv; drop --costs or pass runs written by "
                            "clbench run")
        text = f"Cost per profiled section on {inp.benchmark}: wall time (s) and peak memory (MiB)."
        render = {"csv": lambda: cost_table.costs_csv(frame),
                  "markdown": lambda: cost_table.costs_markdown(frame, text),
                  "latex": lambda: cost_table.costs_latex(frame, latex_escape(text), f"tab:{stem}-costs", layout)}
        report.files[f"{stem}_costs{FORMATS[fmt]}"] = render[fmt]()
    if figures:
        from clbench.reports.figures import heatmap, render, slug

        for m in inp.matrices:
            fig = heatmap(m, score="score", base="base model")
            for ext, blob in render(fig).items():
                report.files[f"figures/{stem}_matrix_{slug(m.method)}_seed{m.seed}.{ext}"] = blob
    return report


register_setting_report(MCIT, "MCIT (LLaVA)", build_mcit_report)  # clbench report on MCIT runs
