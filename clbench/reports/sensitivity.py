"""``clbench report --sensitivity KEY``: Transfer / Average / Last against one swept setting.

``KEY`` is written as for ``--set`` and ``--grid``: ``keeplora.eps_w_vision`` (the runs of that method),
``keeplora.train.lr``, or a run setting such as ``train.lr`` (every method's runs). Each run's value is read
from its ``config.json``. Runs of one method that also differ in other settings (a two-axis grid) form
separate series, named by those settings. Per (series, value): the mean over seeds of the run's own
Transfer / Average / Last (mean over datasets) and the sample standard deviation (``ddof=1``), as in the
comparison table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from clbench.errors import UserError
from clbench.reports.loading import IGNORED_CONFIG_KEYS, IGNORED_CONFIG_PREFIXES, RUN, ReportInput, collect
from clbench.reports.names import method_display
from clbench.sweeps.plan import key_target

METRICS = {"transfer": "Transfer", "average": "Average", "last": "Last"}
COLUMNS = ["series", "method", "key", "value", "seeds"] + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]


def _flatten(data: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, object] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _series_labels(method: str, flats: list[dict[str, object]], path: str) -> list[str]:
    """The method's display name, plus the settings other than ``path`` that differ among its runs."""
    sigs = [{k: json.dumps(v, sort_keys=True) for k, v in f.items()
             if k not in IGNORED_CONFIG_KEYS and not k.startswith(IGNORED_CONFIG_PREFIXES) and k != path}
            for f in flats]
    keys = sorted({k for s in sigs for k in s if any(t.get(k) != s.get(k) for t in sigs)})
    labels = []
    for sig in sigs:
        parts = ", ".join(f"{k.removeprefix('hparams.')}={json.loads(sig[k]) if k in sig else '-'}" for k in keys)
        labels.append(method_display(method) + (f" ({parts})" if parts else ""))
    return labels


def sensitivity_frame(inp: ReportInput, key: str) -> pd.DataFrame:
    """One row per (series, value): number of seeds, mean and sample std of Transfer / Average / Last."""
    method, path = key_target(key)
    runs = [m for m in inp.matrices if m.source == RUN and (method is None or m.method == method)]
    if not runs:
        raise UserError(f"--sensitivity {key}: no complete {method or ''} runs in the input; pass the folder the "
                        "sweep wrote")
    records = []
    for name in dict.fromkeys(m.method for m in runs):
        group = [m for m in runs if m.method == name]
        flats = [_flatten(m.config) for m in group]
        lacking = [m.path for m, f in zip(group, flats, strict=True) if path not in f]
        if lacking:
            raise UserError(f"--sensitivity {key}: {lacking[0]}/config.json has no {path}; was it written by "
                            "another clbench version? Report those runs apart")
        for m, flat, series in zip(group, flats, _series_labels(name, flats, path), strict=True):
            records.append({"series": series, "method": name, "value": flat[path], "seed": m.seed,
                            **{k: float(m.metrics[k]) for k in METRICS}})
    frame = pd.DataFrame(records)
    rows = []
    for (series, value_text), cells in frame.groupby(["series", frame["value"].map(json.dumps)], sort=False):
        n = len(cells)
        row = {"series": series, "method": cells["method"].iloc[0], "key": key, "value": json.loads(value_text),
               "seeds": n}
        for k in METRICS:
            row[f"{k}_mean"] = cells[k].mean()
            row[f"{k}_std"] = cells[k].std(ddof=1) if n > 1 else np.nan
        rows.append(row)
    out = pd.DataFrame(rows, columns=COLUMNS)
    series_order = {s: i for i, s in enumerate(dict.fromkeys(out["series"]))}
    out["_s"] = out["series"].map(series_order)
    out["_v"] = out["value"].map(_sort_key)
    return out.sort_values(["_s", "_v"], kind="stable").drop(columns=["_s", "_v"]).reset_index(drop=True)


def _sort_key(value: object) -> tuple:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return (1, 0.0, json.dumps(value))
    return (0, float(value), "")


def _cell(mean: float, std: float, pm: str) -> str:
    return f"{mean:.1f}" if std is None or math.isnan(std) else f"{mean:.1f}{pm}{std:.1f}"


def _value_text(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def to_table(frame: pd.DataFrame, key: str, pm: str) -> pd.DataFrame:
    """The displayed table: series, value, seeds, then ``mean ± std`` of each metric."""
    return pd.DataFrame({"Setting": frame["series"], key: frame["value"].map(_value_text),
                         "Seeds": frame["seeds"].astype(int).astype(str),
                         **{name: [_cell(m, s, pm) for m, s in zip(frame[f"{k}_mean"], frame[f"{k}_std"], strict=True)]
                            for k, name in METRICS.items()}})


def render_markdown(frame: pd.DataFrame, key: str, caption: str) -> str:
    table = to_table(frame, key, " ± ")
    lines = ["| " + " | ".join(table.columns) + " |", "| :-- | --: | --: | --: | --: | --: |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in table.to_numpy()]
    return "\n".join(lines) + "\n\n" + caption + "\n"


def render_latex(frame: pd.DataFrame, key: str, caption: str, label: str) -> str:
    table = to_table(frame, key, r" $\pm$ ")
    styler = table.style.hide(axis="index").format_index(escape="latex", axis=1).format(escape="latex",
                                                                                        subset=["Setting", key])
    tex = styler.to_latex(column_format="lrrrrr", hrules=True, caption=caption, label=label, position="t",
                          position_float="centering")
    return "% needs \\usepackage{booktabs}\n" + tex


def sensitivity_figure(frame: pd.DataFrame, key: str):
    """Three panels (Transfer, Average, Last) against the value, mean ± std over seeds, one line per series."""
    from matplotlib.figure import Figure

    from clbench.reports.figures import DASHES, MARKERS

    numeric = all(_sort_key(v)[0] == 0 for v in frame["value"])
    categories = list(dict.fromkeys(_value_text(v) for v in frame["value"]))
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (k, name) in zip(axes, METRICS.items(), strict=True):
        for i, (series, cells) in enumerate(frame.groupby("series", sort=False)):
            x = cells["value"].astype(float) if numeric else cells["value"].map(lambda v: categories.index(
                _value_text(v)))
            ax.errorbar(x, cells[f"{k}_mean"], yerr=cells[f"{k}_std"].fillna(0), capsize=3,
                        marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)],
                        color="black" if i % 2 == 0 else "0.45", label=series)
        if numeric:
            values = frame["value"].astype(float)
            if (values > 0).all() and values.max() / values.min() >= 20:
                ax.set_xscale("log")
                ax.minorticks_off()
            ticks = sorted(set(values))
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        else:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_title(name)
        ax.set_xlabel(key)
    axes[0].set_ylabel("accuracy, mean over datasets (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=8)
    return fig


def build_sensitivity_report(paths: list[Path], key: str, fmt: str = "latex", figures: bool = False):
    """The sensitivity table (and figure) of ``key`` over the runs in ``paths``, rendered, not written."""
    from clbench.reports.figures import render, slug
    from clbench.reports.report import FORMATS, Report, describe, table_stem
    from clbench.reports.tables import latex_escape

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    inp = collect(paths)
    frame = sensitivity_frame(inp, key)
    report = Report(warnings=list(inp.warnings))
    if frame["value"].map(json.dumps).nunique() < 2:
        report.warnings.append(f"--sensitivity {key}: every run has the same value ({_value_text(frame['value'][0])})"
                               "; sweep it with --grid")
    stem = f"{table_stem(inp)}_sensitivity_{slug(key)}"
    esc = latex_escape if fmt == "latex" else str
    pm, pct = (r"$\pm$", r"\%") if fmt == "latex" else ("±", "%")
    caption = (f"{esc(describe(inp))}: Transfer, Average and Last ({pct}, mean over datasets) against {esc(key)}; "
               f"mean {pm} sample std over seeds.")
    if fmt == "csv":
        report.files[stem + ".csv"] = frame.to_csv(index=False, float_format="%.4f", lineterminator="\n")
    elif fmt == "markdown":
        report.files[stem + ".md"] = render_markdown(frame, key, caption)
    else:
        report.files[stem + ".tex"] = render_latex(frame, key, caption, f"tab:{stem}")
    if figures:
        for ext, blob in render(sensitivity_figure(frame, key)).items():
            report.files[f"figures/{stem}.{ext}"] = blob
    return report
