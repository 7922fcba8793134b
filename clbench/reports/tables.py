"""The MTIL comparison table: one row per method, one column per dataset plus the mean, three blocks
Transfer / Average / Last, as in ZSCL's and KeepLoRA's papers.

Numbers live in one long frame (:func:`comparison_frame`): block, section, method, seeds, dataset, mean,
std, emphasis. LaTeX (pandas ``Styler.to_latex``), Markdown and CSV are all rendered from that frame, so
they carry the same numbers. Conventions:

- mean over seeds and the *sample* standard deviation (``ddof=1``) where a row has several seeds; the
  number of seeds is part of the row label;
- the Mean column is the run's own Transfer / Average / Last (mean over datasets, per seed), then
  averaged over seeds; Transfer has no value for the first task (nothing is unseen before it);
- best per column in bold, second underlined, ranked on the displayed (rounded) means among the rows
  run here and external matrices; reported literature rows are never ranked (other setups). Bold needs
  at least two ranked values in the column, underline three; equal displayed values share emphasis.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from clbench.reports.latex import LatexLayout, set_table, std_format
from clbench.reports.literature import literature_for, match_datasets
from clbench.reports.loading import EXTERNAL, REFERENCE, REPORTED, RUN, ReportInput
from clbench.reports.names import abbreviate_datasets

BLOCKS = {"transfer": "Transfer", "average": "Average", "last": "Last"}
MEAN = "Mean"
DECIMALS = 1
BEST, SECOND = "best", "second"
SHORT_SECTIONS = {RUN: "run", EXTERNAL: "external", REPORTED: "reported", REFERENCE: "reference"}
LONG_COLUMNS = ["block", "section", "method", "seeds", "dataset", "column", "mean", "std", "emphasis"]


def comparison_frame(inp: ReportInput, with_literature: bool = False) -> pd.DataFrame:
    """The long frame behind every rendering of the comparison table (see the module docstring)."""
    parts = [_measured_rows(label, ms, inp.datasets) for label, ms in inp.groups().items()]
    if with_literature:
        parts.append(reported_rows(inp))
    frame = pd.concat(parts, ignore_index=True)
    frame["column"] = frame["dataset"].map(dict(zip(inp.datasets + [MEAN], abbreviate_datasets(inp.datasets)
                                                    + [MEAN], strict=True)))
    frame["emphasis"] = _emphasis(frame)
    order = {name: i for i, name in enumerate(BLOCKS.values())}
    frame = frame.sort_values("block", key=lambda s: s.map(order), kind="stable")
    return frame[LONG_COLUMNS].reset_index(drop=True)


def _measured_rows(label: str, matrices, datasets: list[str]) -> pd.DataFrame:
    """Mean and sample std over the seeds of one row, per block and dataset (plus Mean)."""
    per_seed = []
    for m in matrices:
        values = {}
        for key, block in BLOCKS.items():
            per_dataset = m.metrics["per_dataset"][key]
            for d in datasets:
                values[(block, d)] = float(per_dataset.get(d, np.nan))
            values[(block, MEAN)] = float(m.metrics[key])
        per_seed.append(values)
    seeds = pd.DataFrame(per_seed)
    n = len(matrices)
    reference = matrices[0].source == RUN and matrices[0].method == "zeroshot"
    rows = [{"block": block, "section": REFERENCE if reference else matrices[0].source, "method": label, "seeds": n,
             "dataset": dataset, "mean": seeds[(block, dataset)].mean(),
             "std": seeds[(block, dataset)].std(ddof=1) if n > 1 else np.nan}
            for block, dataset in seeds.columns]
    frame = pd.DataFrame(rows)
    if matrices[0].source == EXTERNAL:
        frame["seeds"] = np.nan
    return frame


def reported_rows(inp: ReportInput) -> pd.DataFrame:
    """Literature rows for this table's benchmark and order, in the long layout (std empty, not ranked)."""
    lit = match_datasets(literature_for(inp.benchmark, inp.order, inp.own_rule), inp.datasets)
    rows = []
    for method, group in lit.groupby("method", sort=False):
        if (group["verified"] == "secondary").all():
            method = f"{method} (secondary)"
        for _, rec in group.iterrows():
            dataset = rec["dataset"] or MEAN
            for key, block in BLOCKS.items():
                rows.append({"block": block, "section": REPORTED, "method": method, "seeds": np.nan,
                             "dataset": dataset, "mean": float(rec[key]), "std": np.nan})
        for d in inp.datasets + [MEAN]:
            if d not in set(group["dataset"].replace("", MEAN)):
                rows += [{"block": b, "section": REPORTED, "method": method, "seeds": np.nan, "dataset": d,
                          "mean": np.nan, "std": np.nan} for b in BLOCKS.values()]
    return pd.DataFrame(rows, columns=["block", "section", "method", "seeds", "dataset", "mean", "std"])


def literature_sources(inp: ReportInput) -> pd.DataFrame:
    """Method, source and verified status of each reported row shown (one line per method and source)."""
    lit = match_datasets(literature_for(inp.benchmark, inp.order, inp.own_rule), inp.datasets)
    return lit[["method", "source", "verified"]].drop_duplicates().reset_index(drop=True)


def _emphasis(frame: pd.DataFrame) -> pd.Series:
    """'best' / 'second' / '' per cell, ranked per (block, dataset) over the measured rows."""
    out = pd.Series("", index=frame.index, dtype=object)
    measured = frame[frame["section"].isin([RUN, EXTERNAL])]
    for _, cells in measured.groupby(["block", "dataset"], sort=False):
        shown = cells["mean"].dropna().map(displayed)
        distinct = sorted(set(shown), reverse=True)
        if len(shown) >= 2:
            out[shown.index[shown == distinct[0]]] = BEST
        if len(shown) >= 3 and len(distinct) >= 2:
            out[shown.index[shown == distinct[1]]] = SECOND
    return out


def displayed(value: float) -> float:
    """The value as the table prints it (ranking uses this, so equal printed numbers share emphasis)."""
    return float(f"{value:.{DECIMALS}f}")


def row_label(method: str, section: str, seeds: float) -> str:
    """The method label with its seed count for runs (``LoRA (2 seeds)``); the zero-shot row says what it is."""
    if section == REFERENCE:
        return f"{method} (reference)"
    if section != RUN or seeds is None or (isinstance(seeds, float) and math.isnan(seeds)):
        return method
    n = int(seeds)
    return f"{method} ({n} seed{'s' if n != 1 else ''})"


def wide(frame: pd.DataFrame, cell: str = "mean") -> pd.DataFrame:
    """One row per (block, section, label), one column per dataset plus Mean, in table order."""
    frame = frame.assign(label=[row_label(m, s, n) for m, s, n in
                                zip(frame["method"], frame["section"], frame["seeds"], strict=True)])
    columns = list(dict.fromkeys(frame["column"]))
    rows = list(dict.fromkeys(zip(frame["block"], frame["section"], frame["label"], strict=True)))
    sections = list(dict.fromkeys(frame["section"]))
    rows.sort(key=lambda r: (list(BLOCKS.values()).index(r[0]), sections.index(r[1])))
    methods = dict(zip(zip(frame["block"], frame["section"], frame["label"], strict=True), frame["method"],
                       strict=True))
    rows = pair_reported(rows, methods)
    table = frame.pivot(index=["block", "section", "label"], columns="column", values=cell)
    table = table.reindex(index=pd.MultiIndex.from_tuples(rows, names=["block", "section", "label"]),
                          columns=columns)
    table.columns.name = None
    return table


def pair_reported(rows: list[tuple], methods: dict[tuple, str]) -> list[tuple]:
    """Move each reported row right below the row run here of the same method name (``LwF`` below
    ``LwF (1 seed)``; a ``(secondary)`` mark is ignored), block by block; reported rows without a run of their
    name keep their place after the measured rows. ``rows`` are ``(block, section, label)`` in table order,
    ``methods`` gives each row's method name."""
    out: list[tuple] = []
    for block in dict.fromkeys(r[0] for r in rows):
        in_block = [r for r in rows if r[0] == block]
        reported = {}
        for r in in_block:
            if r[1] == REPORTED:
                reported.setdefault(methods[r].removesuffix(" (secondary)"), r)
        paired = set()
        for r in in_block:
            if r[1] == REPORTED:
                continue
            out.append(r)
            match = reported.get(methods[r]) if r[1] == RUN else None
            if match is not None and match not in paired:
                out.append(match)
                paired.add(match)
        out += [r for r in in_block if r[1] == REPORTED and r not in paired]
    return out


def _cell_text(mean: float, std: float, pm: str, na: str, close: str = "") -> str:
    if mean is None or math.isnan(mean):
        return na
    if std is None or math.isnan(std):
        return f"{mean:.{DECIMALS}f}"
    return f"{mean:.{DECIMALS}f}{pm}{std:.{DECIMALS}f}{close}"


def cell_texts(frame: pd.DataFrame, pm: str, na: str, close: str = "") -> pd.DataFrame:
    """The wide table of formatted cells (mean, or mean ± std; ``close`` ends the std's markup)."""
    texts = frame.assign(text=[_cell_text(m, s, pm, na, close)
                               for m, s in zip(frame["mean"], frame["std"], strict=True)])
    return wide(texts, "text")


def _drop_single_section(table: pd.DataFrame) -> pd.DataFrame:
    """The section level is shown only when the table mixes rows run here with external or reported ones (the
    zero-shot reference row says what it is in its own label)."""
    sections = set(table.index.get_level_values("section")) - {REFERENCE}
    if len(sections) <= 1:
        return table.droplevel("section")
    return table


def to_latex(frame: pd.DataFrame, caption: str, label: str, layout: LatexLayout | None = None) -> str:
    """Booktabs LaTeX through ``Styler.to_latex``: multirow block labels, ``\\textbf`` / ``\\underline``, a rule
    under the zero-shot reference row, set in ``layout`` (compact and fitted to the column by default)."""
    layout = layout or LatexLayout()
    before_std, after_std = std_format(layout)
    texts = _drop_single_section(cell_texts(frame, before_std, "--", after_std))
    marks = _drop_single_section(wide(frame, "emphasis")).fillna("")
    css = {BEST: "textbf: --rwrap;", SECOND: "underline: --rwrap;", "": ""}
    if layout.compact and "section" in texts.index.names:  # the caption says what each section is
        texts = texts.rename(index=SHORT_SECTIONS, level="section")
    texts.index.names = [None] * texts.index.nlevels
    styler = texts.style.apply(lambda _: marks.map(css.get).set_axis(texts.index), axis=None)
    styler = styler.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    tex = styler.to_latex(
        column_format="l" * texts.index.nlevels + "r" * texts.shape[1], hrules=True, clines="skip-last;data",
        multirow_align="t", caption=caption, label=label, position="t", position_float="centering",
    )
    return set_table(_rule_after_reference(booktabs_rules(tex), texts.index.nlevels + texts.shape[1]), layout)


def _rule_after_reference(tex: str, ncols: int) -> str:
    """A ``\\cmidrule`` under each zero-shot reference row (unless a rule follows anyway)."""
    lines = tex.splitlines()
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        ruled = following.startswith(("\\cmidrule", "\\midrule", "\\bottomrule"))
        if "(reference)" in line and line.rstrip().endswith("\\\\") and not ruled:
            out.append(rf"\cmidrule(l){{2-{ncols}}}")
    return "\n".join(out) + "\n"


def booktabs_rules(tex: str) -> str:
    """Turn Styler's ``\\cline`` group separators into booktabs rules: a rule across the whole table becomes
    ``\\midrule``, a partial one ``\\cmidrule(l)``; a separator right before ``\\bottomrule`` is dropped."""
    lines = tex.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        spans = re.findall(r"\\cline\{(\d+)-(\d+)\}", line)
        if not spans or re.sub(r"\\cline\{\d+-\d+\}", "", line).strip():
            out.append(line)
            continue
        if i + 1 < len(lines) and lines[i + 1].strip() == r"\bottomrule":
            continue
        start = min(int(a) for a, _ in spans)
        end = max(int(b) for _, b in spans)
        out.append(r"\midrule" if start == 1 else rf"\cmidrule(l){{{start}-{end}}}")
    return "\n".join(out) + "\n"


def to_markdown(frame: pd.DataFrame, caption: str, notes: list[str]) -> str:
    """A GitHub Markdown table with the same cells: best in ``**bold**``, second in ``<ins>underline</ins>``."""
    texts = _drop_single_section(cell_texts(frame, " ± ", "–"))
    marks = _drop_single_section(wide(frame, "emphasis")).fillna("")
    wrap = {BEST: "**{}**", SECOND: "<ins>{}</ins>", "": "{}"}
    body = pd.DataFrame([[wrap[mk].format(tx) for tx, mk in zip(t_row, m_row, strict=True)]
                         for t_row, m_row in zip(texts.to_numpy(), marks.to_numpy(), strict=True)],
                        index=texts.index, columns=texts.columns)
    names = ["Block", "Method"] if texts.index.nlevels == 2 else ["Block", "Rows", "Method"]
    header = names + [str(c) for c in body.columns]
    lines = [_md_row(header), _md_row([":--"] * len(names) + ["--:"] * body.shape[1])]
    previous: tuple = ()
    for key, values in zip(body.index, body.to_numpy(), strict=True):
        shown = [k if previous[:i + 1] != key[:i + 1] or i == len(key) - 1 else "" for i, k in enumerate(key)]
        previous = key
        lines.append(_md_row([_md_escape(s) for s in shown] + list(values)))
    text = "\n".join(lines) + "\n\n" + caption + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {_md_escape(n)}" for n in notes) + "\n"
    return text


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_csv(frame: pd.DataFrame) -> str:
    """The long frame as CSV: one line per cell with full-precision mean and std and its emphasis."""
    return frame.to_csv(index=False, float_format="%.4f", lineterminator="\n")


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text (captions)."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(ch, ch) for ch in str(text))
