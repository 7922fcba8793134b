"""Command-line conventions: -h and --version, choices enumerated in help, bare flags, shell completion,
``report --out -`` on stdout, error texts that name an option once, and a remark on 0-1 matrices."""

from __future__ import annotations

import re
from pathlib import Path

import click
import numpy as np
import pytest
import typer
from fake_runs import write_fake_run

from clbench.cli.app import app, main
from clbench.storage.results import accuracy_frame, atomic_write_csv

ROOT = Path(__file__).resolve().parents[2]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, cmd in group.commands.items():
        found.append((*prefix, name))
        if isinstance(cmd, click.Group):
            found += _commands(cmd, (*prefix, name))
    return found


ALL_COMMANDS = _commands(typer.main.get_command(app))


def _help(capsys, *args: str) -> str:
    assert main([*args, "-h"]) == 0
    return capsys.readouterr().out


def test_version_matches_pyproject(capsys) -> None:
    expected = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"clbench {expected}"


def test_top_level_help_offers_completion_and_short_help(capsys) -> None:
    text = _help(capsys)
    assert "-h, --help" in text and "--install-completion" in text and "--version" in text


def test_top_level_help_names_both_settings(capsys) -> None:
    """The suite is not CLIP-only: the first help line names the LLaVA setting beside CLIP."""
    text = " ".join(_help(capsys).split())
    assert "CLIP on MTIL / X-TAIL" in text and "LLaVA on UCIT / MLLM-DCL" in text


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_every_help_is_plain_with_bare_flags(capsys, command: tuple[str, ...]) -> None:
    text = _help(capsys, *command)
    assert "<bool>" not in text and "╭" not in text, text
    assert "-h, --help" in text


def test_choices_are_enumerated(capsys) -> None:
    presets = "|".join(sorted(p.stem for p in (ROOT / "clbench" / "presets").glob("*.json")))
    benchmarks = {("run",): "<synthetic|mtil|xtail|synthetic-mcit|ucit|mllm-dcl>",
                  ("sweep",): "<synthetic|mtil|xtail|synthetic-mcit|ucit|mllm-dcl>"}
    for command in (("run",), ("sweep",)):
        text = " ".join(_help(capsys, *command).split())
        for choice in (benchmarks[command], "<task|union>", "<fp32|amp>", f"<{presets}>", "<auto|cpu|cuda[:i]>"):
            assert choice in text, (command, choice)
    assert "<latex|markdown|csv>" in _help(capsys, "report")


def test_bad_choice_is_one_line(tmp_path: Path, capsys) -> None:
    code = main(["run", "--methods", "lora", "--benchmark", "cifar", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'cifar' is not one of" in err, err


def test_set_error_names_the_option_once(tmp_path: Path, capsys) -> None:
    code = main(["run", "--methods", "keeplora", "--set", "keeplora.train.nosuch=1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "error: --set keeplora.train.nosuch: unknown key 'nosuch'" in err, err
    assert err.count("--set") == 1


@pytest.fixture()
def one_run(tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    write_fake_run(out, "lora", 0)
    return out


def test_report_out_dash_prints_to_stdout(one_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(one_run), "--format", "markdown", "--out", "-"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Block | Method") and "| Last | LoRA (1 seed) |" in out, out
    assert not (tmp_path / "-").exists() and not (tmp_path / "reports").exists()


def test_report_out_dash_refuses_figures(one_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["report", str(one_run), "--figures", "--out", "-"])
    captured = capsys.readouterr()
    assert code == 2 and "--figures" in captured.err and not captured.out.strip()
    assert not (tmp_path / "-").exists()


def _matrix(path: Path, scale: float) -> Path:
    names = ["A", "B", "C"]
    rows = np.array([[60.0, 30.0, 20.0], [55.0, 70.0, 25.0], [50.0, 65.0, 80.0]]) * scale
    atomic_write_csv(path, accuracy_frame(rows.tolist(), names, names))
    return path


@pytest.mark.parametrize("scale,remark", [(0.01, True), (1.0, False)])
def test_metrics_remarks_on_fractions(tmp_path: Path, capsys, scale: float, remark: bool) -> None:
    assert main(["metrics", str(_matrix(tmp_path / "m.csv", scale))]) == 0
    captured = capsys.readouterr()
    assert ("between 0 and 1" in captured.err) is remark, captured.err
    # Last = mean of the final row, by hand: (50 + 65 + 80) / 3 = 65, in the file's units
    assert re.search(rf"last\s+{65 * scale:.2f}", captured.out), captured.out
