"""Report figures readable for nine methods: one colour and marker per row across figures, the zero-shot run as a
reference line, metric axes zoomed to the values, chance level drawn, cost bars without double-counted nested
sections (totals checked by hand), readable section names, and a log option for the state growth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_runs import write_fake_run

from clbench.reports.costs import exclusive_seconds
from clbench.reports.figures import (
    REFERENCE_STYLE,
    accuracy_over_tasks,
    cost_bars,
    metrics_bars,
    report_styles,
    state_curve,
)
from clbench.reports.loading import collect
from clbench.reports.tables import comparison_frame

NINE = ["zeroshot", "finetune", "lora", "zscl", "inflora", "loda", "keeplora", "keeplora+", "keeplora++"]
DATASETS = ["A", "B", "C"]


@pytest.fixture(scope="module")
def nine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nine")
    for method in NINE:
        for seed in (0, 1):
            path = write_fake_run(out, method, seed, datasets=DATASETS, with_state=method not in ("zeroshot", "lora"))
            manifest = json.loads((path / "manifest.json").read_text())
            manifest["classes"] = {"A": 10, "B": 4, "C": 25}
            (path / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_nine_rows_have_distinct_styles_and_zero_shot_is_the_reference(nine: Path) -> None:
    styles = report_styles(collect([nine]))
    assert list(styles)[0] == "Zero-shot"
    assert styles["Zero-shot"]["linestyle"] == REFERENCE_STYLE["linestyle"] and styles["Zero-shot"]["marker"] is None
    others = [(s["color"], s["marker"]) for label, s in styles.items() if label != "Zero-shot"]
    assert len(others) == 8 and len({c for c, _ in others}) == 8 and len({m for _, m in others}) == 8


def test_metric_axes_are_zoomed_and_zero_shot_is_a_line(nine: Path) -> None:
    inp = collect([nine])
    frame = comparison_frame(inp)
    fig = metrics_bars(frame, report_styles(inp))
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(ticks) == 8 and not any("Zero-shot" in t for t in ticks)  # zero-shot is a line, not a dot
    for ax, block in zip(fig.axes, ["Transfer", "Average", "Last"], strict=True):
        means = frame[(frame["dataset"] == "Mean") & (frame["block"] == block)]
        ranked = means[means["method"] != "Zero-shot"]
        low, high = ax.get_xlim()
        assert low > 0 or (ranked["mean"] - ranked["std"].fillna(0)).min() < 5  # not from 0 unless values are
        assert low <= (ranked["mean"] - ranked["std"].fillna(0)).min() and high >= ranked["mean"].max()
        zero_shot = means.loc[means["method"] == "Zero-shot", "mean"].iloc[0]
        vertical = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert vertical == [pytest.approx(zero_shot)]


def test_accuracy_over_tasks_draws_chance_from_class_counts(nine: Path) -> None:
    fig = accuracy_over_tasks(collect([nine]))
    for ax, classes in zip(fig.axes, [10, 4, 25], strict=True):
        dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert len(dotted) == 1 and dotted[0].get_ydata()[0] == pytest.approx(100 / classes)
        rows = [line for line in ax.get_lines() if not line.get_label().startswith("_") and line not in dotted]
        assert len(rows) == 9


def _profile(path: Path, rows: list[tuple]) -> None:
    pd.DataFrame(rows, columns=["task", "section", "seconds", "peak_bytes", "parent"]).to_csv(
        path / "profile.csv", index=False)


def test_nested_sections_are_counted_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    keep = write_fake_run(runs, "keeplora", 0, datasets=DATASETS)
    zscl = write_fake_run(runs, "zscl", 0, datasets=DATASETS)
    _profile(keep, [(-1, "setup", 2.0, 1, ""), (-1, "pretrained_svd", 0.5, 1, "setup"), (0, "train", 3.0, 1, ""),
                    (1, "train", 1.0, 1, "")])
    _profile(zscl, [(-1, "setup", 1.0, 1, ""), (0, "train", 3.0, 1, ""), (0, "reference_forward", 1.2, 1, "train"),
                    (1, "train", 2.0, 1, ""), (1, "reference_forward", 0.3, 1, "train")])
    seconds, known = exclusive_seconds(collect([runs]))
    got = {(r.method, r.section): r.seconds for r in seconds.itertuples()}
    # by hand: own time = time minus the time of the sections run inside it, summed over the tasks
    assert known and got == pytest.approx({("ZSCL", "setup"): 1.0, ("ZSCL", "train"): 5.0 - 1.5,
                                           ("ZSCL", "reference_forward"): 1.5, ("KeepLoRA", "setup"): 1.5,
                                           ("KeepLoRA", "pretrained_svd"): 0.5, ("KeepLoRA", "train"): 4.0})
    ax = cost_bars(seconds, known).axes[0]
    totals = sorted(t.get_text() for t in ax.texts)
    assert totals == ["6.0 s", "6.0 s"]  # the runs' top-level totals: 2 + 3 + 1 and 1 + 3 + 2
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "SVD of pretrained weights" in legend and "reference-model forward" in legend
    assert "pretrained_svd" not in legend


def test_profiles_without_nesting_say_so(tmp_path: Path) -> None:
    run = write_fake_run(tmp_path, "lora", 0, datasets=DATASETS)
    frame = pd.read_csv(run / "profile.csv").drop(columns="parent")
    frame.to_csv(run / "profile.csv", index=False)
    seconds, known = exclusive_seconds(collect([tmp_path]))
    assert not known and "nesting not recorded" in cost_bars(seconds, known).axes[0].get_xlabel()


def test_profiler_records_the_parent_section() -> None:
    from clbench.costs.profiler import Profiler

    prof = Profiler()
    with prof.section("setup"), prof.section("pretrained_svd"):
        pass
    with prof.section("eval"):
        pass
    assert {r.section: r.parent for r in prof.records} == {"setup": "", "pretrained_svd": "setup", "eval": ""}
    assert "parent" in prof.frame().columns


@pytest.mark.parametrize("log", [False, True])
def test_state_growth_log_option(nine: Path, log: bool) -> None:
    from clbench.reports.costs import state_growth

    inp = collect([nine])
    growth = state_growth(inp)
    ax = state_curve(growth, DATASETS, log=log, styles=report_styles(inp)).axes[0]
    assert ax.get_yscale() == ("log" if log else "linear")
    assert len(ax.get_lines()) == growth["method"].nunique() == 7
    assert np.isfinite([line.get_ydata() for line in ax.get_lines()]).all()
