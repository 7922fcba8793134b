"""Logs: nothing is cut to 80 columns when the output is not a terminal, a finished task is one plain line in a
log file, and the overall progress (method i/n, task t/T, ETA) is computed right."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from clbench.cli.app import main
from clbench.cli.consoles import UNBOUNDED, make_console
from clbench.engine.progress import Overall, RunProgress, format_duration

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--set", "data.num_tasks=2"]


def test_console_is_unbounded_off_a_terminal(monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert make_console().width == UNBOUNDED
    monkeypatch.setenv("COLUMNS", "97")
    assert make_console().width == 97


@pytest.mark.parametrize("quiet", [False, True])
def test_run_output_to_a_file_is_not_truncated(tmp_path: Path, capsys, quiet: bool) -> None:
    out = tmp_path / ("a_results_folder_with_a_name_long_enough_to_pass_eighty_columns_" * 2)
    args = ["run", "--methods", "zeroshot,lora", "--out", str(out), *SMOKE]
    assert main(args + (["--quiet"] if quiet else [])) == 0
    captured = capsys.readouterr()
    assert "…" not in captured.out
    for method in ("zeroshot", "lora"):
        path = str(out / "synthetic-order1" / method / "seed0")
        assert any(path in line for line in captured.out.splitlines()), captured.out
    progress_lines = [line for line in captured.err.splitlines() if " done; overall " in line]
    if quiet:
        assert progress_lines == []
    else:
        assert [line.split(";")[0] for line in progress_lines] == [
            "zeroshot: task 1/2 done", "zeroshot: task 2/2 done", "lora: task 1/2 done", "lora: task 2/2 done"]
        assert "overall 4/4" in progress_lines[-1] and "ETA 0s" in progress_lines[-1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_overall_counts_and_eta_by_hand() -> None:
    clock = Clock()
    overall = Overall(["a", "b"], clock=clock)
    overall.start_method("a")
    assert overall.total is None and overall.eta() is None and overall.describe() == "method 1/2 a, task 1/?"
    clock.now = 10.0
    overall.task_done(0, 4)  # one task in 10 s, 7 of 8 left
    assert (overall.completed, overall.total, overall.eta()) == (1, 8, 70.0)
    assert overall.describe() == "method 1/2 a, task 2/4"
    overall.start_method("b")
    clock.now = 30.0
    overall.task_done(0, 4)  # a's 4 tasks count as done; 2 tasks ran here in 30 s, 3 left
    assert (overall.completed, overall.eta()) == (5, 45.0)
    assert overall.describe() == "method 2/2 b, task 2/4"


def test_resumed_tasks_count_as_done_but_not_in_the_rate() -> None:
    clock = Clock()
    overall = Overall(["a"], clock=clock)
    overall.start_method("a")
    clock.now = 5.0
    overall.task_done(2, 4)  # resumed after task 2: tasks 1-2 were done before, task 3 took 5 s
    assert (overall.completed, overall.eta()) == (3, 5.0)


@pytest.mark.parametrize("seconds,text", [(0.4, "0s"), (42, "42s"), (185, "3m05s"), (7620, "2h07m")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_terminal_shows_the_overall_bar() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    with RunProgress(quiet=False, console=console, methods=["a", "b"]) as progress:
        hooks = progress.hooks_for("a")
        hooks.on_phase("zero-shot eval", 3)
        hooks.on_row(0, [50.0, 40.0, 30.0])
    text = buffer.getvalue()
    assert "overall: method 1/2 a, task 2/3" in text and "ETA" in text and "1/6" in text
    assert " done; overall " not in text  # the per-task lines are for logs, not for a terminal
