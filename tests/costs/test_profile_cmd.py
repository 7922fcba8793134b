"""The profiler (sections, per-section process peak, exact tensor peak, summary) and ``clbench profile``."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from rich.console import Console

from clbench.cli.app import main
from clbench.costs.fake import fixed_order_loaders, random_benchmark, random_task, task_context
from clbench.costs.profile import CSV_COLUMNS, ProfileSettings, growth_table, profile_methods, section_table
from clbench.costs.profiler import MIB, Profiler, TensorPeakTracker, profile_summary, summarise_profile
from clbench.datasets.base import ImageSpec

SPEC = ImageSpec(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _rendered(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


# ---- TensorPeakTracker --------------------------------------------------------------------------------------
def test_tracker_counts_new_storages_until_freed() -> None:
    old = torch.ones(10_000)
    with TensorPeakTracker() as tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B; live 8000
        view = a[::2]  # a view: no new memory
        a.add_(1)  # in place: no new memory
        del b  # live 4000
        c = torch.empty(250)  # 1000 B; live 5000
        del old  # created before: never counted, so live stays 5000
        d = c + 1  # 1000 B; live 6000
    assert tracker.peak == 8000
    assert tracker.live == 6000
    assert view.shape == (500,) and d.shape == (250,)


def test_tracker_sees_autograd_backward() -> None:
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64)
    with TensorPeakTracker() as tracker:
        layer(x).sum().backward()
    grad_bytes = sum(p.numel() * 4 for p in layer.parameters())
    assert tracker.live == grad_bytes  # only the .grad tensors, created in the backward pass, are still alive
    assert tracker.peak >= grad_bytes


# ---- Profiler -------------------------------------------------------------------------------------------------
def test_sections_aggregate_per_task_and_track_tensors() -> None:
    profiler = Profiler(track_tensors=True)
    profiler.task = 0
    with profiler.section("work"):
        x = torch.ones(1_000_000)  # 4 MB
    with profiler.section("work"):
        y = torch.ones(250_000)
    profiler.task = 1
    with profiler.section("work"):
        pass
    frame = profiler.frame()
    assert list(frame["task"]) == [0, 1]
    first = frame.iloc[0]
    assert first["calls"] == 2 and first["tensor_peak_bytes"] == 4_000_000
    assert frame.iloc[1]["tensor_peak_bytes"] == 0
    assert first["memory_kind"] in {"cpu_section_peak_rss", "cpu_process_peak_rss"}
    assert (frame["seconds"] >= 0).all() and (frame["peak_bytes"] > 0).all()
    assert x.numel() + y.numel() == 1_250_000


def test_untracked_sections_leave_the_tensor_column_empty() -> None:
    profiler = Profiler()
    with profiler.section("work"):
        torch.ones(10)
    assert profiler.frame()["tensor_peak_bytes"].isna().all()


def _section_rss_available() -> bool:
    return Profiler().memory_kind == "cpu_section_peak_rss"


@pytest.mark.skipif(not _section_rss_available(), reason="needs Linux with a writable /proc/self/clear_refs")
def test_cpu_peak_is_per_section_and_nested_sections_fold_into_outer() -> None:
    profiler = Profiler()
    big = 200 * MIB
    with profiler.section("outer"):
        before = torch.ones(1024)
        with profiler.section("big"):
            block = torch.ones(big // 4)  # touched, so resident
            del block
        after = before + 1  # work in the outer section after the inner one ended
    with profiler.section("small"):
        block = torch.ones(MIB // 4)
        del block
    rows = profiler.frame().set_index("section")
    growth = rows["peak_bytes"] - rows["start_bytes"]
    assert growth["big"] >= 0.9 * big
    assert growth["outer"] >= 0.9 * big  # the inner section's reset did not lose the outer peak
    assert growth["small"] < 0.25 * big  # a later section does not inherit the earlier peak
    assert profiler.process_peak_bytes >= rows.loc["big", "peak_bytes"]
    assert float(after.sum()) == 2048.0


@pytest.mark.skipif(not _section_rss_available(), reason="needs Linux with a writable /proc/self/clear_refs")
def test_a_second_profiler_does_not_hide_the_peak_of_an_open_section() -> None:
    outer, inner = Profiler(), Profiler()
    big = 200 * MIB
    with outer.section("method"):
        with inner.section("other"):
            block = torch.ones(big // 4)
            del block
        torch.ones(16)
    row = outer.frame().iloc[0]
    assert row["peak_bytes"] - row["start_bytes"] >= 0.9 * big


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sections_record_allocated_peak() -> None:
    device = torch.device("cuda")
    profiler = Profiler(device=device)
    with profiler.section("outer"):
        before = torch.ones(1024, device=device)
        with profiler.section("inner"):
            block = torch.ones(64 * MIB // 4, device=device)
            del block
        before += 1
    rows = profiler.frame().set_index("section")
    assert set(rows["memory_kind"]) == {"cuda_peak_allocated"}
    assert (rows["peak_bytes"] - rows["start_bytes"] >= 64 * MIB).all()


def test_profile_summary_totals_and_table() -> None:
    frame = pd.DataFrame({
        "task": [0, 0, 1, 1], "section": ["grad_estimation", "train", "grad_estimation", "train"],
        "seconds": [1.0, 10.0, 3.0, 20.0], "peak_bytes": [5 * MIB, 7 * MIB, 6 * MIB, 8 * MIB],
        "memory_kind": ["cpu_section_peak_rss"] * 4, "calls": [1, 1, 1, 2],
        "start_bytes": [4 * MIB, 4 * MIB, 4 * MIB, 5 * MIB], "tensor_peak_bytes": [MIB, 2 * MIB, 3 * MIB, None]})
    summary = profile_summary(frame).set_index("section")
    assert list(summary.index) == ["grad_estimation", "train"]
    assert summary.loc["grad_estimation", "seconds_total"] == 4.0
    assert summary.loc["grad_estimation", "seconds_per_task"] == 2.0
    assert summary.loc["train", "calls"] == 3
    assert summary.loc["train", "growth_bytes"] == 3 * MIB
    assert summary.loc["grad_estimation", "tensor_peak_bytes"] == 3 * MIB
    text = _rendered(summarise_profile(frame))
    assert "grad_estimation" in text and "train" in text and "3.0 MiB" in text
    assert "peak RSS in section" in text


def test_summary_reads_old_profiles_without_new_columns() -> None:
    frame = pd.DataFrame({"task": [0], "section": ["eval"], "seconds": [0.5], "peak_bytes": [MIB],
                          "memory_kind": ["cuda_peak_allocated"]})
    summary = profile_summary(frame)
    assert summary.loc[0, "calls"] == 1 and pd.isna(summary.loc[0, "tensor_peak_bytes"])
    assert "eval" in _rendered(summarise_profile(frame))


# ---- random tasks ----------------------------------------------------------------------------------------------
def test_random_task_shapes_and_balanced_labels() -> None:
    task = random_task(2, SPEC, num_classes=3, train_size=12, test_size=6, seed=1)
    images, labels = task.train.tensors
    assert images.shape == (12, 3, 8, 8) and task.name == "random2"
    assert torch.bincount(labels).tolist() == [4, 4, 4]
    assert len(task.classnames) == 3 and task.prompts(0)[0] == "a photo of a class 0 of random2."
    again = random_task(2, SPEC, num_classes=3, train_size=12, test_size=6, seed=1)
    assert torch.equal(again.train.tensors[0], images)


def test_fixed_order_loaders_repeat_and_fractions_are_prefixes() -> None:
    task = random_task(0, SPEC, 2, 20, 2)
    ctx = task_context(task, 0, 1, "cpu", batch_size=4)
    first = [labels.tolist() for _, labels in ctx.batches()]
    assert first == [labels.tolist() for _, labels in ctx.batches()]
    assert [labels.tolist() for _, labels in ctx.batches(0.4)] == first[:2]
    loader = fixed_order_loaders(4, seed=3)(task.train)
    assert len(loader) == 5


def test_random_benchmark_sizes() -> None:
    bench = random_benchmark(SPEC, num_tasks=3, num_classes=2, train_batches=2, batch_size=5)
    assert [len(t.train) for t in bench.tasks] == [10, 10, 10] and [len(t.test) for t in bench.tasks] == [5] * 3


# ---- clbench profile -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_profile():
    settings = ProfileSettings(backbone="tiny", tasks=2, batches=1, batch_size=4, classes=3, steps=1, device="cpu")
    return profile_methods(["keeplora", "lora"], settings)


def test_profile_runs_the_methods_cost_centres(tiny_profile) -> None:
    sections = tiny_profile.sections
    keeplora = set(sections.loc[sections["method"] == "keeplora", "section"])
    assert {"pretrained_svd", "grad_estimation", "grad_svd", "train", "merge", "feature_stats", "feature_svd",
            "eval"} <= keeplora
    lora = sections[sections["method"] == "lora"]
    assert set(lora["section"]) == {"train", "merge", "eval"}
    assert sorted(set(lora["task"])) == [0, 1]
    assert sections["tensor_peak_bytes"].notna().all() and (sections["seconds"] > 0).all()


def test_profile_growth_curve_is_the_stored_basis(tiny_profile) -> None:
    state = tiny_profile.state
    keeplora = state[state["method"] == "keeplora"].sort_values("task")
    assert list(keeplora["task"]) == [-1, 0, 1]
    # every adapted matrix of the tiny backbone is 128 wide: float32 bases of 128 × k
    assert list(keeplora["state_bytes"]) == [4 * 128 * int(k) for k in keeplora["basis_columns"]]
    assert keeplora["state_bytes"].is_monotonic_increasing and keeplora["state_bytes"].iloc[-1] > 0
    assert (state.loc[state["method"] == "lora", "state_bytes"] == 0).all()


def test_profile_tables_and_csv(tiny_profile) -> None:
    text = _rendered(section_table(tiny_profile))
    assert "grad_estimation" in text and "keeplora" in text and "s/step" in text
    growth = _rendered(growth_table(tiny_profile))
    assert "setup" in growth and "task 2" in growth
    frame = tiny_profile.csv_frame()
    assert list(frame.columns) == CSV_COLUMNS
    assert set(frame["kind"]) == {"section", "state"}


def test_profile_command_writes_csv(tmp_path) -> None:
    out = tmp_path / "costs" / "profile.csv"
    args = ["profile", "--methods", "lora", "--tasks", "1", "--batches", "1", "--batch-size", "2", "--classes", "2",
            "--steps", "1", "--no-evaluate", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args) == 0
    frame = pd.read_csv(out)
    assert set(frame.loc[frame["kind"] == "section", "section"]) == {"train", "merge"}
    assert (frame.loc[frame["kind"] == "state", "task"] == [-1, 0]).all()


@pytest.mark.parametrize("args", [
    ["--methods", ""],
    ["--methods", "nosuchmethod"],
    ["--methods", "lora", "--tasks", "0"],
    ["--methods", "lora", "--set", "train.lr=1"],
    ["--methods", "lora", "--set", "keeplora.rank=4"],
    ["--methods", "lora", "--set", "lora.nosuchkey=1"],
    ["--methods", "lora", "--out", "table.txt"],
])
def test_profile_user_errors(args: list[str], capsys) -> None:
    assert main(["profile", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
