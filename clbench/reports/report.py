"""``clbench report``: read runs and matrices, build every requested output in memory, then write.

Nothing is written until every input has been read, checked and rendered, so a bad input leaves the
output folder untouched; each file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from clbench.errors import UserError
from clbench.reports import costs as cost_table
from clbench.reports.latex import LatexLayout
from clbench.reports.loading import RUN, SETTING_REPORTS, ReportInput, collect, input_setting
from clbench.reports.names import benchmark_display
from clbench.reports.tables import (
    comparison_frame,
    latex_escape,
    literature_sources,
    to_csv,
    to_latex,
    to_markdown,
)
from clbench.storage.results import atomic_write_bytes, atomic_write_text, group_label
from clbench.storage.safeio import check_path, exists, os_reason

FORMATS = {"latex": ".tex", "markdown": ".md", "csv": ".csv"}


@dataclass
class Report:
    """Rendered outputs by relative path (text or bytes), and warnings for the user."""

    files: dict[str, str | bytes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def build_report(paths: list[Path], fmt: str = "latex", labels: list[str] | None = None,
                 with_literature: bool = False, figures: bool = False, costs: bool = False,
                 layout: LatexLayout | None = None, state_log: bool = False) -> Report:
    """Every output of one ``clbench report`` call, rendered but not written (LaTeX set in ``layout``)."""
    layout = layout or LatexLayout()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    setting = input_setting(paths)
    if setting is not None:  # e.g. LLaVA runs: MCITlib's columns, from the setting's own module
        if setting not in SETTING_REPORTS:
            raise UserError(f"runs of setting {setting!r} have no report table here; report them with the clbench "
                            "command that wrote them")
        entry = SETTING_REPORTS[setting]
        if with_literature or labels:
            raise UserError(f"--with-literature and --label apply to CLIP (MTIL) tables; drop them for {entry.title} "
                            "runs")
        return entry.build(paths, fmt, figures, costs, layout)
    inp = collect(paths, labels)
    partial = coverage(inp)
    if with_literature and partial is not None:
        raise UserError(f"--with-literature: {partial[0]} of the {partial[1]} tasks of {partial[2]} ran; the published "
                        f"numbers are over all {partial[1]} in the paper's order (Average and Last depend on the whole "
                        "sequence), so they do not compare; drop --with-literature, or report runs of the full "
                        "sequence")
    report = Report(warnings=list(inp.warnings))
    stem = table_stem(inp)
    frame = comparison_frame(inp, with_literature)
    sources = literature_sources(inp) if with_literature else None
    if with_literature and (sources is None or not len(sources)):
        report.warnings.append(f"no literature rows for {describe(inp)}; the table has no reported block")
    report.files[stem + FORMATS[fmt]] = _render_table(frame, inp, fmt, sources, layout)
    cost_frame = cost_table.cost_frame(inp) if (costs or figures) else None
    if costs:
        if cost_frame is None or not len(cost_frame):
            raise UserError("--costs: no run in the input has a profile.csv; drop --costs or pass runs written "
                            "by clbench run")
        report.files[f"{stem}_costs{FORMATS[fmt]}"] = _render_costs(cost_frame, inp, fmt, layout)
    if figures:
        from clbench.reports.figures import all_figures, render

        growth = cost_table.state_growth(inp)
        for name, fig in all_figures(inp, frame, cost_frame, growth, state_log).items():
            for ext, blob in render(fig).items():
                report.files[f"figures/{stem}_{name}.{ext}"] = blob
    return report


def write_report(report: Report, out: Path) -> list[Path]:
    """Write every file of ``report`` under ``out``, all or nothing; returns the paths.

    Every file is first written into a hidden staging folder inside ``out`` (same file system), then renamed
    into place. A failure while staging (full disk, read-only folder) removes the staging folder and any
    folder made here, and leaves ``out`` as it was; the failure is one line."""
    out = check_path(out, "--out")
    if not exists(out) and out.is_symlink():
        raise UserError(f"--out {out} is a broken symlink; give a folder")
    if exists(out) and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    root = out.resolve()
    for rel in report.files:  # names come partly from the input (a manifest's benchmark): never outside out
        if root not in (out / rel).resolve().parents:
            raise UserError(f"refusing to write {rel!r}: it would fall outside --out {out}; the input names a path "
                            "(check the benchmark in its manifest.json files)")
    made = _missing_dirs(out)
    staging: Path | None = None
    placed: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".clbench-report-", dir=out))
        for rel, content in report.files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                atomic_write_bytes(target, content)
            else:
                atomic_write_text(target, content)
        for rel in report.files:
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, path)
            placed.append(path)
    except OSError as exc:
        for path in placed:  # a rename failed half-way (rare): take back what was placed
            path.unlink(missing_ok=True)
        _cleanup(staging, made)
        where = exc.filename or out
        raise UserError(f"cannot write the report in {out}: {os_reason(exc)} ({where}); nothing was written, free "
                        "space or pass --out to a folder you can write") from None
    except BaseException:
        _cleanup(staging, made)
        raise
    _cleanup(staging, [])
    return placed


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not exists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _cleanup(staging: Path | None, made: list[Path]) -> None:
    """Remove the staging folder and the (empty) folders made for the report, innermost first."""
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()


def table_stem(inp: ReportInput) -> str:
    """File stem: ``<benchmark>-order<k>``, or ``report`` when the input names no benchmark."""
    if inp.benchmark is None:
        return "report"
    name = group_label(inp.benchmark, inp.eval_rule)
    return f"{name}-order{inp.order}" if inp.order is not None else name


RULES = {"task": "per-task label space", "union": "union label space"}


def coverage(inp: ReportInput) -> tuple[int, int, str] | None:
    """``(tasks run, the protocol's tasks, the protocol's order as named)`` when the runs of a real benchmark
    trained another sequence than one of its orders in full (``--datasets``, ``data.num_tasks``); else None."""
    from clbench.datasets.sequence import DISPLAY, protocol_names

    if inp.benchmark not in DISPLAY:
        return None
    orders = _protocol_orders(inp.benchmark)
    full = orders.get(inp.order or 1, [])
    if [d.lower() for d in inp.datasets] == [d.lower() for d in full]:
        return None
    return len(inp.datasets), len(protocol_names(inp.benchmark)), benchmark_display(inp.benchmark, inp.order)


def _protocol_orders(benchmark: str) -> dict[int, list[str]]:
    if benchmark == "mtil":
        from clbench.datasets.mtil_names import ORDERS
    else:
        from clbench.datasets.xtail_names import ORDERS
    return {k: list(v) for k, v in ORDERS.items()}


def _is_prefix(inp: ReportInput) -> bool:
    """Whether the runs' tasks are the first tasks of their order (``data.num_tasks``), not a selection."""
    full = [d.lower() for d in _protocol_orders(inp.benchmark).get(inp.order or 1, [])]
    return [d.lower() for d in inp.datasets] == full[: len(inp.datasets)]


def describe(inp: ReportInput) -> str:
    """``MTIL Order I, preset default, per-task label space``; the task list when the input names no benchmark.
    The preset and the evaluation rule are named whenever the rows include runs made here."""
    if inp.benchmark is None:
        return f"{len(inp.datasets)} tasks ({', '.join(inp.datasets)})"
    partial = coverage(inp)
    if partial is not None and not _is_prefix(inp):  # a --datasets selection: no order of the protocol
        text = f"{benchmark_display(inp.benchmark, None)} selection ({', '.join(inp.datasets)})"
    else:
        text = benchmark_display(inp.benchmark, inp.order)
    if inp.preset:
        text += f", preset {inp.preset}"
    if inp.eval_rule:
        text += f", {RULES.get(inp.eval_rule, inp.eval_rule)}"
    return text


def _caption(inp: ReportInput, with_reported: str | bool, fmt: str) -> str:
    esc = latex_escape if fmt == "latex" else str
    pm = r"$\pm$" if fmt == "latex" else "±"
    pct = r"\%" if fmt == "latex" else "%"
    text = (f"{esc(describe(inp))}: Transfer, Average and Last accuracy ({pct}) per dataset and "
            f"their mean. Rows with several seeds show mean {pm} sample std (seeds in the row label). "
            "Best per column in bold, second underlined, among the rows run here and external matrices"
            + ("; the zero-shot row is a reference, not ranked." if _has_reference(inp) else "."))
    partial = coverage(inp)
    if partial is not None:
        text += (f" {partial[0]} of the protocol's {partial[1]} tasks ran ({esc(', '.join(inp.datasets))}): the "
                 f"means are over this sequence, not the {partial[1]}-task protocol's.")
    if len(inp.datasets) == 1:
        text += (" Transfer is undefined for a one-task sequence: it averages the accuracy on each dataset before "
                 "it is trained, and the only dataset is trained first.")
    if with_reported:
        text += " Reported rows are copied from their sources, not re-run, and not ranked"
        text += ("; (secondary): cited by a later paper, not checked against the authors' files."
                 if with_reported == "secondary" else ".")
    return text


def _has_reference(inp: ReportInput) -> bool:
    return any(m.source == RUN and m.method == "zeroshot" for m in inp.matrices)


def _notes(sources) -> list[str]:
    """One line per reported method: its sources and their status."""
    if sources is None:
        return []
    return [f"{method}: " + "; ".join(f"{r.source} ({r.verified})" for r in group.itertuples())
            for method, group in sources.groupby("method", sort=False)]


def _render_table(frame, inp: ReportInput, fmt: str, sources, layout: LatexLayout) -> str:
    reported: str | bool = sources is not None and len(sources) > 0
    if reported and (sources["verified"] == "secondary").any():
        reported = "secondary"
    if fmt == "csv":
        return to_csv(frame)
    caption = _caption(inp, reported, fmt)
    if fmt == "markdown":
        return to_markdown(frame, caption, _notes(sources))
    notes = "".join(f"% reported: {line}\n" for line in _notes(sources))
    return notes + to_latex(frame, caption, f"tab:{table_stem(inp)}", layout)


def _render_costs(frame, inp: ReportInput, fmt: str, layout: LatexLayout) -> str:
    if fmt == "csv":
        return cost_table.costs_csv(frame)
    esc = latex_escape if fmt == "latex" else str
    caption = (f"Cost per profiled section on {esc(describe(inp))}: wall time (s) mean over the tasks it ran in "
               "and total over the run; peak memory (MiB) mean over those tasks and maximum; mean over seeds.")
    if fmt == "markdown":
        return cost_table.costs_markdown(frame, caption)
    return cost_table.costs_latex(frame, caption, f"tab:{table_stem(inp)}-costs", layout)
