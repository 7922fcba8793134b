"""The cost table (``clbench report --costs``): wall time and peak memory per profiled section per method.

From each run's ``profile.csv`` (one line per task and section; task -1 is the setup and zero-shot
evaluation before the first task). Per run and section: the mean over the tasks the section ran in and
the total over the run for seconds; the mean over those tasks and the maximum for peak memory. Rows with
several seeds show the mean of these per-seed figures. Peak memory is whatever the profiler measured
(``memory_kind``: CUDA allocated bytes, or the CPU process's peak RSS, a high-water mark since the process
started); the table names the kind. Sections a method nests inside another (one timed inside ``train``)
are counted in both, as the profile records them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clbench.reports.latex import LatexLayout, set_table
from clbench.reports.loading import RUN, ReportInput
from clbench.reports.tables import booktabs_rules

MIB = 2**20
MEMORY_KINDS = {"cuda_peak_allocated": "CUDA allocated", "cpu_section_peak_rss": "CPU RSS peak in section",
                "cpu_process_peak_rss": "CPU process RSS"}
COLUMNS = {"tasks": "tasks", "seconds_mean": "s / task", "seconds_total": "s total",
           "peak_mib_mean": "peak MiB / task", "peak_mib_max": "peak MiB max", "memory": "memory"}


def cost_frame(inp: ReportInput) -> pd.DataFrame:
    """One row per (method, section): seeds and the :data:`COLUMNS` figures; empty when no run has a profile."""
    rows = []
    for label, matrices in inp.groups().items():
        profiled = [m for m in matrices if m.source == RUN and m.profile is not None and len(m.profile)]
        if not profiled:
            continue
        per_seed = pd.concat([_run_costs(m.profile).assign(seed=i) for i, m in enumerate(profiled)])
        for section, group in per_seed.groupby("section", sort=False):
            kinds = sorted(set(group["memory_kind"]))
            rows.append({"method": label, "section": section, "seeds": len(profiled),
                         **{k: float(group[k].mean()) for k in COLUMNS if k != "memory"},
                         "memory": " / ".join(MEMORY_KINDS.get(k, k) for k in kinds)})
    return pd.DataFrame(rows, columns=["method", "section", "seeds", *COLUMNS])


def _run_costs(profile: pd.DataFrame) -> pd.DataFrame:
    """Per section of one run, in first-seen order: tasks, seconds mean/total, peak MiB mean/max."""
    profile = profile.assign(memory_kind=profile.get("memory_kind", pd.Series("unknown", index=profile.index))
                             .fillna("unknown").astype(str))
    out = profile.groupby("section", sort=False).agg(
        tasks=("task", "nunique"), seconds_mean=("seconds", "mean"), seconds_total=("seconds", "sum"),
        peak_mib_mean=("peak_bytes", "mean"), peak_mib_max=("peak_bytes", "max"),
        memory_kind=("memory_kind", "first"))
    out[["peak_mib_mean", "peak_mib_max"]] = out[["peak_mib_mean", "peak_mib_max"]] / MIB
    return out.reset_index()


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """Formatted cells indexed by (method with seed count, section)."""
    labels = [f"{m} ({n} seed{'s' if n != 1 else ''})" for m, n in zip(frame["method"], frame["seeds"], strict=True)]
    cells = pd.DataFrame({
        COLUMNS["tasks"]: [f"{x:g}" for x in frame["tasks"]],
        COLUMNS["seconds_mean"]: [f"{x:.2f}" for x in frame["seconds_mean"]],
        COLUMNS["seconds_total"]: [f"{x:.1f}" for x in frame["seconds_total"]],
        COLUMNS["peak_mib_mean"]: [f"{x:.1f}" for x in frame["peak_mib_mean"]],
        COLUMNS["peak_mib_max"]: [f"{x:.1f}" for x in frame["peak_mib_max"]],
        COLUMNS["memory"]: list(frame["memory"]),
    })
    cells.index = pd.MultiIndex.from_arrays([labels, list(frame["section"])], names=["Method", "Section"])
    return cells


def costs_latex(frame: pd.DataFrame, caption: str, label: str, layout: LatexLayout | None = None) -> str:
    """Booktabs LaTeX through ``Styler.to_latex``, methods as multirow groups, set in ``layout``."""
    cells = _display(frame)
    cells.index.names = [None, None]
    styler = cells.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    styler = styler.format(escape="latex")
    tex = styler.to_latex(column_format="ll" + "r" * (cells.shape[1] - 1) + "l", hrules=True,
                          clines="skip-last;data", multirow_align="t", caption=caption, label=label,
                          position="t", position_float="centering")
    return set_table(booktabs_rules(tex), layout or LatexLayout())


def costs_markdown(frame: pd.DataFrame, caption: str) -> str:
    """The same cells as a Markdown table."""
    cells = _display(frame)
    header = ["Method", "Section", *cells.columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join([":--", ":--"] + ["--:"] * 5 + [":--"]) + " |"]
    previous = None
    for (method, section), values in zip(cells.index, cells.to_numpy(), strict=True):
        lines.append("| " + " | ".join([method if method != previous else "", section, *values]) + " |")
        previous = method
    return "\n".join(lines) + "\n\n" + caption + "\n"


def costs_csv(frame: pd.DataFrame) -> str:
    """Full-precision numbers, one line per (method, section)."""
    return frame.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def state_growth(inp: ReportInput) -> pd.DataFrame:
    """Stored state per task (sum over the named pieces a method holds after that task), mean over seeds:
    columns method, task, mib. Empty when no run wrote ``state_bytes.csv``."""
    rows = []
    for label, matrices in inp.groups().items():
        per_seed = [m.state.groupby("task")["bytes"].sum() for m in matrices if m.state is not None and len(m.state)]
        if not per_seed:
            continue
        mean = pd.concat(per_seed, axis=1).mean(axis=1)
        rows += [{"method": label, "task": int(t), "mib": float(b) / MIB} for t, b in mean.items()
                 if np.isfinite(b)]
    return pd.DataFrame(rows, columns=["method", "task", "mib"])


def exclusive_seconds(inp: ReportInput) -> tuple[pd.DataFrame, bool]:
    """Seconds each section spent outside the sections nested in it, total over the run, mean over seeds: columns
    method, section, seconds. The parts add up to the run's total (a nested section's time, e.g. KeepLoRA's
    ``pretrained_svd`` inside ``setup`` or ZSCL's ``reference_forward`` inside ``train``, is counted once).
    The flag is False when some profile predates the ``parent`` column (nesting unknown, so counted twice)."""
    rows = []
    nesting_known = True
    for label, matrices in inp.groups().items():
        per_seed = []
        for m in matrices:
            if m.source != RUN or m.profile is None or not len(m.profile):
                continue
            profile = m.profile
            if "parent" not in profile:
                nesting_known = False
                profile = profile.assign(parent="")
            parents = profile["parent"].astype(object).where(profile["parent"].notna(), "").astype(str)
            nested = profile[parents != ""].groupby([profile["task"], parents])["seconds"].sum()
            own = [s - nested.get((t, name), 0.0) for t, name, s in
                   zip(profile["task"], profile["section"], profile["seconds"], strict=True)]
            per_seed.append(profile.assign(seconds=own).groupby("section", sort=False)["seconds"].sum())
        if per_seed:
            mean = pd.concat(per_seed, axis=1).fillna(0).mean(axis=1)
            rows += [{"method": label, "section": section, "seconds": max(float(v), 0.0)} for section, v in
                     mean.items()]
    return pd.DataFrame(rows, columns=["method", "section", "seconds"]), nesting_known
