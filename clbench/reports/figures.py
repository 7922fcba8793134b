"""Report figures (matplotlib, Agg canvas, no pyplot state), each rendered to PNG and PDF bytes.

Readable in greyscale: the heatmap uses ``viridis`` (lightness rises monotonically) with the numbers
printed in the cells; bars differ by hatch as well as grey level, lines by marker and dash pattern.

- ``heatmap_<row>[_seed<s>]``: the accuracy matrix of each run or external matrix, zero-shot row first
  when the run has one, the just-trained task (diagonal) outlined;
- ``metrics``: Transfer / Average / Last (Mean column) per row, grouped bars with ± std over seeds;
- ``costs``: seconds per profiled section, stacked, total over the run (mean over seeds);
- ``state_growth``: stored state after each task (only when a run wrote ``state_bytes.csv``);
- ``accuracy_over_tasks``: one panel per dataset, accuracy after each task, one line per row.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from clbench.reports.loading import REPORTED, Matrix, ReportInput
from clbench.reports.names import abbreviate_datasets
from clbench.reports.tables import BLOCKS, MEAN, row_label

HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "--", "++", "**", "||", "O."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h"]
DASHES = ["-", "--", ":", "-."]


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


def heatmap(m: Matrix) -> Figure:
    """Accuracy after each task (rows) on every dataset (columns), zero-shot row first if known."""
    names = abbreviate_datasets(m.datasets)
    rows = [f"after {n}" for n in names]
    values = m.accuracy.to_numpy()
    offset = 0
    if m.zeroshot is not None:
        values = np.vstack([m.zeroshot.to_numpy(dtype=float), values])
        rows = ["zero-shot", *rows]
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
    ax.set_title(f"{m.label}{seed}: accuracy (%), outlined = task just trained")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return fig


def metrics_bars(frame: pd.DataFrame) -> Figure:
    """Grouped bars of the Mean column per block, one bar per measured row, ± std over seeds."""
    means = frame[(frame["dataset"] == MEAN) & frame["section"].ne(REPORTED)]
    labels = list(dict.fromkeys(row_label(m, s, n) for m, s, n in
                                zip(means["method"], means["section"], means["seeds"], strict=True)))
    means = means.assign(label=[row_label(m, s, n) for m, s, n in
                                zip(means["method"], means["section"], means["seeds"], strict=True)])
    blocks = list(BLOCKS.values())
    fig = Figure(figsize=(max(5.0, 1.2 + 0.5 * len(labels) * len(blocks)) + 2.5, 4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(labels), 1)
    for i, (label, colour) in enumerate(zip(labels, greys(len(labels)), strict=True)):
        cells = means[means["label"] == label].set_index("block").reindex(blocks)
        x = np.arange(len(blocks)) + (i - (len(labels) - 1) / 2) * width
        ax.bar(x, cells["mean"].fillna(0), width, yerr=cells["std"].fillna(0), capsize=3, color=colour,
               edgecolor="black", hatch=HATCHES[i % len(HATCHES)], label=label)
        for xi, v in zip(x, cells["mean"], strict=True):
            if np.isfinite(v):
                ax.text(xi, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(blocks)), blocks)
    ax.set_ylabel("accuracy, mean over datasets (%)")
    ax.set_xlabel("MTIL metric")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def cost_bars(costs: pd.DataFrame) -> Figure:
    """Stacked bars: total seconds of each profiled section, one bar per method."""
    table = costs.pivot_table(index="method", columns="section", values="seconds_total", sort=False).fillna(0)
    fig = Figure(figsize=(max(4.5, 1.5 + 0.9 * len(table)) + 2, 4), layout="constrained")
    ax = fig.add_subplot()
    bottom = np.zeros(len(table))
    x = np.arange(len(table))
    for j, (section, colour) in enumerate(zip(table.columns, greys(len(table.columns)), strict=True)):
        ax.bar(x, table[section], 0.6, bottom=bottom, color=colour, edgecolor="black",
               hatch=HATCHES[j % len(HATCHES)], label=section)
        bottom += table[section].to_numpy()
    ax.set_xticks(x, list(table.index), rotation=20, ha="right")
    ax.set_ylabel("wall time, total over the run (s)")
    ax.set_xlabel("method (mean over seeds)")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], title="profiled section\n(top to bottom)", fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    return fig


def state_curve(growth: pd.DataFrame, datasets: list[str]) -> Figure:
    """Stored state (MiB) after each task, one line per method."""
    fig = Figure(figsize=(max(5.0, 0.5 * len(datasets) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    kib = growth["mib"].max() < 1
    for i, (method, group) in enumerate(growth.groupby("method", sort=False)):
        ax.plot(group["task"] + 1, group["mib"] * (1024 if kib else 1), marker=MARKERS[i % len(MARKERS)],
                linestyle=DASHES[i % len(DASHES)], color="black" if i % 2 == 0 else "0.45", label=method)
    ax.set_xticks(range(1, len(datasets) + 1), [f"{i}: {n}" for i, n in enumerate(abbreviate_datasets(datasets), 1)],
                  rotation=45, ha="right")
    ax.set_xlabel("after training task")
    ax.set_ylabel(f"stored state between tasks ({'KiB' if kib else 'MiB'})")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return fig


def accuracy_over_tasks(inp: ReportInput) -> Figure:
    """One panel per dataset: accuracy after 0 (zero-shot) .. T tasks, mean over seeds, one line per row."""
    names = abbreviate_datasets(inp.datasets)
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True, sharey=True)
    groups = inp.groups()
    steps = np.arange(len(names) + 1)
    for d, (dataset, short) in enumerate(zip(inp.datasets, names, strict=True)):
        ax = axes[d // cols][d % cols]
        for i, (label, matrices) in enumerate(groups.items()):
            curve = _mean_curve(matrices, dataset)
            ax.plot(steps[-len(curve):], curve, marker=MARKERS[i % len(MARKERS)], markersize=3,
                    linestyle=DASHES[i % len(DASHES)], color="black" if i % 2 == 0 else "0.45",
                    label=row_label(label, matrices[0].source, len(matrices)))
        ax.axvline(d + 1, color="0.6", linewidth=0.8, linestyle=":")
        ax.set_title(f"{short} (trained at task {d + 1})", fontsize=9)
        ax.set_ylim(0, 100)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("tasks trained (0 = zero-shot)")
    for row in axes:
        row[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=min(4, len(labels)), fontsize=8)
    return fig


def _mean_curve(matrices: list[Matrix], dataset: str) -> np.ndarray:
    """Accuracy on ``dataset`` after each task, mean over seeds; zero-shot first only if every seed has it."""
    with_zs = all(m.zeroshot is not None for m in matrices)
    curves = [np.concatenate([[m.zeroshot[dataset]] if with_zs else [], m.accuracy[dataset].to_numpy()])
              for m in matrices]
    return np.mean(curves, axis=0)


def all_figures(inp: ReportInput, frame: pd.DataFrame, costs: pd.DataFrame, growth: pd.DataFrame) -> dict[str, Figure]:
    """Every figure the report makes, by file stem."""
    figures: dict[str, Figure] = {}
    for m in inp.matrices:
        stem = f"heatmap_{slug(m.label)}" + ("" if m.seed is None else f"_seed{m.seed}")
        while stem in figures:  # two labels with the same file-safe form
            stem += "_"
        figures[stem] = heatmap(m)
    figures["metrics"] = metrics_bars(frame)
    if len(costs):
        figures["costs"] = cost_bars(costs)
    if len(growth):
        figures["state_growth"] = state_curve(growth, inp.datasets)
    figures["accuracy_over_tasks"] = accuracy_over_tasks(inp)
    return figures
