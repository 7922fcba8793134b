"""Report figures (matplotlib, Agg canvas, no pyplot state), each rendered to PNG and PDF bytes.

Made to be read with nine methods side by side: every row keeps one colour and one marker in every figure
(:func:`row_styles`, Okabe-Ito's colour-blind-safe palette, markers telling rows apart in greyscale too), rows
follow the report's fixed method order, and the zero-shot run is drawn as a grey dashed reference, not as a
competitor.

- ``heatmap_<row>[_seed<s>]``: the accuracy matrix of each run or external matrix, zero-shot row first
  when the run has one, the just-trained task (diagonal) outlined;
- ``metrics``: Transfer / Average / Last (Mean column), one panel each, a dot per row with ± std over seeds, on
  an axis zoomed to the values (it does not start at 0, so gaps of a point show), zero-shot as a dashed line;
- ``costs``: wall time per profiled section, stacked horizontal bars; a section nested in another (recorded as
  its ``parent``) is taken out of its parent, so the bar's length is the run's total, labelled at its end;
- ``state_growth``: stored state after each task (only when a run wrote ``state_bytes.csv``), linear or log;
- ``accuracy_over_tasks``: one panel per dataset, accuracy after each task, one line per row, chance level
  (100 / classes) dotted where the class count is known.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from clbench.reports.loading import REFERENCE, REPORTED, RUN, Matrix, ReportInput
from clbench.reports.names import abbreviate_datasets, section_display
from clbench.reports.tables import BLOCKS, MEAN, row_label

HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "--", "++", "**", "||", "O."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h"]
DASHES = ["-", "--", ":", "-."]
# Okabe & Ito's colour-blind-safe palette without its yellow (too light on white), then Tol's wine and olive.
PALETTE = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#882255", "#999933"]
REFERENCE_STYLE = {"color": "0.55", "linestyle": "--", "linewidth": 1.4}


def row_styles(labels: list[str], reference: set[str] | None = None) -> dict[str, dict]:
    """Colour and marker of each row label, by position in the report's row order; the zero-shot reference
    row gets the grey dashed reference style instead."""
    reference = reference or set()
    styles, i = {}, 0
    for label in labels:
        if label in reference:
            styles[label] = {**REFERENCE_STYLE, "marker": None}
            continue
        styles[label] = {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)], "linestyle": "-",
                         "linewidth": 1.3}
        i += 1
    return styles


def slug(text: str) -> str:
    """A file-name-safe form of a row label."""
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("_") or "row"


def greys(n: int) -> list:
    """``n`` fill colours from dark to light grey-blue, distinct in greyscale."""
    from matplotlib import colormaps

    cmap = colormaps["cividis"]
    return [cmap(x) for x in np.linspace(0.1, 0.95, max(n, 1))][:n]


def render(fig: Figure) -> dict[str, bytes]:
    """PNG (150 dpi) and PDF bytes of ``fig``; fixed metadata so reruns give the same PDF."""
    out = {}
    for fmt, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=150, metadata=meta)
        out[fmt] = buf.getvalue()
        fig.set_layout_engine("none")  # the layout is done: keep it for the second format (one draw, not two)
    return out


def heatmap(m: Matrix, score: str = "accuracy", base: str = "zero-shot") -> Figure:
    """``score`` after each task (rows) on every dataset (columns), the ``base`` model's row first if known."""
    names = abbreviate_datasets(m.datasets)
    rows = [f"after {n}" for n in names]
    values = m.accuracy.to_numpy()
    offset = 0
    if m.zeroshot is not None:
        values = np.vstack([m.zeroshot.to_numpy(dtype=float), values])
        rows = [base, *rows]
        offset = 1
    size = max(4.0, 0.55 * len(names) + 2)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7, color="black" if v > 55 else "white")
    for t in range(len(names)):
        for colour, width in (("white", 3.0), ("black", 1.4)):
            ax.add_patch(Rectangle((t - 0.5, t + offset - 0.5), 1, 1, fill=False, edgecolor=colour, linewidth=width))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated dataset")
    ax.set_ylabel("model (training order, top to bottom)")
    seed = "" if m.seed is None else f", seed {m.seed}"
    ax.set_title(f"{m.label}{seed}: {score} (%), outlined = task just trained")
    fig.colorbar(image, ax=ax, label=f"{score} (%)")
    return fig


def metrics_bars(frame: pd.DataFrame, styles: dict[str, dict] | None = None) -> Figure:
    """Transfer / Average / Last (Mean column): one panel each, a dot per row (± std over seeds) on an axis
    zoomed to the values, the zero-shot reference as a dashed vertical line."""
    means = frame[(frame["dataset"] == MEAN) & frame["section"].ne(REPORTED)]
    means = means.assign(label=[row_label(m, s, n) for m, s, n in
                                zip(means["method"], means["section"], means["seeds"], strict=True)])
    reference = set(means.loc[means["section"] == REFERENCE, "label"])
    labels = list(dict.fromkeys(means["label"]))
    ranked = [label for label in labels if label not in reference]
    by_method = styles or row_styles(list(dict.fromkeys(means["method"])),
                                     set(means.loc[means["section"] == REFERENCE, "method"]))
    styles = {label: by_method[method] for label, method in zip(means["label"], means["method"], strict=True)}
    blocks = list(BLOCKS.values())
    fig = Figure(figsize=(10.5, 1.2 + 0.36 * max(len(ranked), 3)), layout="constrained")
    axes = fig.subplots(1, len(blocks), sharey=True)
    y = np.arange(len(ranked))[::-1]
    for ax, block in zip(axes, blocks, strict=True):
        cells = means[means["block"] == block].set_index("label")
        values = cells["mean"].reindex(ranked).to_numpy(dtype=float)
        errors = cells["std"].reindex(ranked).fillna(0).to_numpy(dtype=float)
        for yi, label, v, e in zip(y, ranked, values, errors, strict=True):
            if np.isfinite(v):
                style = styles[label]
                ax.errorbar(v, yi, xerr=e if e > 0 else None, color=style["color"], marker=style["marker"],
                            markersize=7, capsize=3, linestyle="none")
                ax.annotate(f"{v:.1f}", (v, yi), xytext=(0, 7), textcoords="offset points", ha="center",
                            fontsize=7)
        shown = [*(values - errors), *(values + errors)]
        for label in reference:
            ref = cells["mean"].get(label, np.nan)
            if np.isfinite(ref):
                ax.axvline(ref, **REFERENCE_STYLE, label=f"{label}: {ref:.1f}")
                shown.append(ref)
        shown = np.array([v for v in shown if np.isfinite(v)])
        if len(shown):
            low, high = shown.min(), shown.max()
            pad = max(1.0, 0.08 * (high - low))
            ax.set_xlim(max(0.0, low - pad), min(100.0, high + pad))
        ax.set_title(f"{block} (%)", fontsize=10)
        ax.grid(axis="x", color="0.9")
        ax.set_axisbelow(True)
        if reference:
            ax.legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(y, ranked)
    axes[0].set_ylim(-0.7, len(ranked) - 0.3)
    fig.supxlabel("accuracy, mean over datasets (%); axes zoomed to the values, not from 0", fontsize=9)
    return fig


def cost_bars(seconds: pd.DataFrame, nesting_known: bool = True) -> Figure:
    """Stacked horizontal bars of wall time per section (own time: nested sections taken out of their parent),
    one bar per method in row order, the run's total at the end of each bar."""
    table = seconds.pivot_table(index="method", columns="section", values="seconds", sort=False).fillna(0)
    table = table.loc[:, table.sum() > 0]
    order = table.sum().sort_values(ascending=False).index  # the biggest section first, at the left
    table = table[order]
    from matplotlib import colormaps

    colours = [colormaps["tab20"](i % 20) for i in range(len(table.columns))]
    fig = Figure(figsize=(10, 1.4 + 0.42 * len(table)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(table))[::-1]
    left = np.zeros(len(table))
    for j, (section, colour) in enumerate(zip(table.columns, colours, strict=True)):
        ax.barh(y, table[section], 0.62, left=left, color=colour, edgecolor="black", linewidth=0.5,
                hatch=HATCHES[j % len(HATCHES)], label=section_display(str(section)))
        left += table[section].to_numpy()
    for yi, total in zip(y, left, strict=True):
        ax.annotate(f"{total:.1f} s", (total, yi), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_yticks(y, list(table.index))
    ax.set_xlim(0, left.max() * 1.12 if len(left) and left.max() > 0 else 1)
    note = "" if nesting_known else " (nesting not recorded: nested sections also counted in their parent)"
    ax.set_xlabel("wall time, total over the run, mean over seeds (s); nested sections taken out of their parent"
                  + note, fontsize=9)
    ax.legend(title="profiled section", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def state_curve(growth: pd.DataFrame, datasets: list[str], log: bool = False,
                styles: dict[str, dict] | None = None) -> Figure:
    """Stored state after each task, one line per method (same colours and markers as every figure);
    ``log`` puts the state on a log axis, for methods whose state differs by orders of magnitude."""
    fig = Figure(figsize=(max(6.0, 0.5 * len(datasets) + 3.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    kib = growth["mib"].max() < 1
    styles = styles or row_styles(list(dict.fromkeys(growth["method"])))
    for method, group in growth.groupby("method", sort=False):
        style = styles[method]
        ax.plot(group["task"] + 1, group["mib"] * (1024 if kib else 1), marker=style["marker"],
                color=style["color"], linestyle="-", linewidth=1.3, label=method)
    ax.set_xticks(range(1, len(datasets) + 1), [f"{i}: {n}" for i, n in enumerate(abbreviate_datasets(datasets), 1)],
                  rotation=45, ha="right")
    ax.set_xlabel("after training task")
    unit = "KiB" if kib else "MiB"
    if log:
        ax.set_yscale("log")
        ax.set_ylabel(f"stored state between tasks ({unit}, log scale)")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"stored state between tasks ({unit})")
    ax.grid(color="0.9")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def accuracy_over_tasks(inp: ReportInput, styles: dict[str, dict] | None = None) -> Figure:
    """One panel per dataset: accuracy after 0 (zero-shot) .. T tasks, mean over seeds, one line per row, the
    zero-shot reference dashed grey, chance level dotted where the class count is known."""
    names = abbreviate_datasets(inp.datasets)
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig = Figure(figsize=(3.3 * cols, 2.7 * nrows + 1.0), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True, sharey=True)
    groups = inp.groups()
    labels = {label: row_label(label, REFERENCE if _is_reference(ms) else ms[0].source, len(ms))
              for label, ms in groups.items()}
    styles = styles or report_styles(inp)
    chance = chance_levels(inp)
    steps = np.arange(len(names) + 1)
    for d, (dataset, short) in enumerate(zip(inp.datasets, names, strict=True)):
        ax = axes[d // cols][d % cols]
        for label, matrices in groups.items():
            curve = _mean_curve(matrices, dataset)
            style = styles[label]
            ax.plot(steps[-len(curve):], curve, marker=style["marker"], markersize=3.5, color=style["color"],
                    linestyle=style["linestyle"], linewidth=style["linewidth"], label=labels[label])
        if dataset in chance:
            ax.axhline(chance[dataset], color="0.35", linestyle=":", linewidth=1.0, label="chance (100 / classes)")
        ax.axvline(d + 1, color="0.8", linewidth=4, alpha=0.5, zorder=0)
        ax.set_title(f"{short} (trained at task {d + 1})", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", color="0.92")
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("tasks trained (0 = zero-shot)")
    for row in axes:
        row[0].set_ylabel("accuracy (%)")
    handles, texts = {}, []
    for ax in axes.flat[:len(names)]:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            if text not in handles:
                handles[text] = handle
                texts.append(text)
    fig.legend([handles[t] for t in texts], texts, loc="outside upper center", ncol=min(5, len(texts)), fontsize=8)
    return fig


def report_styles(inp: ReportInput) -> dict[str, dict]:
    """The style of each row of the report (by row label, in row order), shared by all its figures."""
    groups = inp.groups()
    return row_styles(list(groups), {label for label, ms in groups.items() if _is_reference(ms)})


def _is_reference(matrices: list[Matrix]) -> bool:
    return matrices[0].source == RUN and matrices[0].method == "zeroshot"


def chance_levels(inp: ReportInput) -> dict[str, float]:
    """Chance accuracy (%) per dataset where every run agrees on its class count: 100 / classes under the
    per-task rule, 100 / all classes of the sequence under the union rule."""
    counts: dict[str, set[int]] = {}
    for m in inp.matrices:
        for d, n in m.classes.items():
            counts.setdefault(d, set()).add(n)
    known = {d: next(iter(n)) for d, n in counts.items() if len(n) == 1 and d in inp.datasets}
    if inp.eval_rule == "union":
        if len(known) != len(inp.datasets):
            return {}
        return dict.fromkeys(inp.datasets, 100.0 / sum(known.values()))
    return {d: 100.0 / n for d, n in known.items()}


def _mean_curve(matrices: list[Matrix], dataset: str) -> np.ndarray:
    """Accuracy on ``dataset`` after each task, mean over seeds; zero-shot first only if every seed has it."""
    with_zs = all(m.zeroshot is not None for m in matrices)
    curves = [np.concatenate([[m.zeroshot[dataset]] if with_zs else [], m.accuracy[dataset].to_numpy()])
              for m in matrices]
    return np.mean(curves, axis=0)


def all_figures(inp: ReportInput, frame: pd.DataFrame, costs: pd.DataFrame, growth: pd.DataFrame,
                state_log: bool = False) -> dict[str, Figure]:
    """Every figure the report makes, by file stem."""
    from clbench.reports.costs import exclusive_seconds

    figures: dict[str, Figure] = {}
    for m in inp.matrices:
        stem = f"heatmap_{slug(m.label)}" + ("" if m.seed is None else f"_seed{m.seed}")
        while stem in figures:  # two labels with the same file-safe form
            stem += "_"
        figures[stem] = heatmap(m)
    styles = report_styles(inp)
    figures["metrics"] = metrics_bars(frame, styles)
    if len(costs):
        figures["costs"] = cost_bars(*exclusive_seconds(inp))
    if len(growth):
        figures["state_growth"] = state_curve(growth, inp.datasets, log=state_log, styles=styles)
    figures["accuracy_over_tasks"] = accuracy_over_tasks(inp, styles)
    return figures
