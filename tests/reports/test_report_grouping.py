"""Reports compare like with like: runs of several methods made with different settings are refused, the caption
names the preset and the evaluation rule, the zero-shot run is an unranked reference row, and rows follow one
fixed, documented method order."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fake_runs import write_fake_run

from clbench.cli.app import main

NINE = ["keeplora++", "lora", "zeroshot", "loda", "keeplora+", "zscl", "finetune", "inflora", "keeplora"]
# the order the README documents, written out by hand
DISPLAY_ORDER = ["Zero-shot (reference)", "Fine-tune", "LoRA", "ZSCL", "InfLoRA", "LoDA", "KeepLoRA", "KeepLoRA+",
                 "KeepLoRA++"]


def _edit_config(run: Path, **changes) -> None:
    config = json.loads((run / "config.json").read_text())
    for dotted, value in changes.items():
        head, _, key = dotted.partition("__")
        if key:
            config[head][key] = value
        else:
            config[head] = value
    (run / "config.json").write_text(json.dumps(config))


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    return err


def test_methods_under_different_settings_are_refused(tmp_path: Path, capsys) -> None:
    write_fake_run(tmp_path / "results", "lora", 0)
    other = write_fake_run(tmp_path / "other", "keeplora", 0)
    _edit_config(other, preset="smoke", data__train_per_class=8)
    out = tmp_path / "rep"
    err = _one_line_error(capsys, main(["report", str(tmp_path / "results"), str(tmp_path / "other"),
                                        "--out", str(out)]))
    assert "different settings" in err and "data.train_per_class" in err and "preset" in err
    assert "default" in err and "smoke" in err and "clbench report" in err
    assert not out.exists()


def test_one_method_under_two_settings_becomes_two_labelled_rows(tmp_path: Path, capsys) -> None:
    write_fake_run(tmp_path / "a", "lora", 0)
    _edit_config(write_fake_run(tmp_path / "b", "lora", 0), data__train_per_class=8)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--format", "csv", "--out",
                 str(tmp_path / "rep")]) == 0
    frame = pd.read_csv(next((tmp_path / "rep").glob("*.csv")))
    assert len(set(frame["method"])) == 2 and all("data.train_per_class=" in m for m in set(frame["method"]))


@pytest.fixture()
def nine(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    for method in NINE:
        write_fake_run(out, method, 0)
    return out


def test_caption_names_preset_and_rule(nine: Path, tmp_path: Path) -> None:
    assert main(["report", str(nine), "--format", "markdown", "--out", str(tmp_path / "rep")]) == 0
    text = next((tmp_path / "rep").glob("*.md")).read_text()
    assert "Synthetic Order I, preset default, per-task label space:" in text
    assert "the zero-shot row is a reference, not ranked" in text


def test_rows_follow_the_fixed_method_order(nine: Path, tmp_path: Path) -> None:
    assert main(["report", str(nine), "--format", "markdown", "--out", str(tmp_path / "rep")]) == 0
    lines = next((tmp_path / "rep").glob("*.md")).read_text().splitlines()
    labels = [line.split("|")[2].strip() for line in lines if line.startswith("|")][2:]
    assert [label.removesuffix(" (1 seed)") for label in labels[:9]] == DISPLAY_ORDER


def test_zero_shot_is_a_reference_outside_the_ranking(nine: Path, tmp_path: Path) -> None:
    assert main(["report", str(nine), "--format", "csv", "--out", str(tmp_path / "rep")]) == 0
    frame = pd.read_csv(next((tmp_path / "rep").glob("*.csv")), keep_default_na=False, na_values=[""])
    frame["emphasis"] = frame["emphasis"].fillna("")
    reference = frame[frame["method"] == "Zero-shot"]
    assert set(reference["section"]) == {"zero-shot reference"} and set(reference["emphasis"]) == {""}
    ranked = frame[frame["method"] != "Zero-shot"].dropna(subset=["mean"])
    for _, cells in ranked.groupby(["block", "dataset"]):  # best = the highest printed mean of the others
        shown = cells["mean"].map(lambda v: round(v, 1))
        assert set(cells.loc[shown == shown.max(), "emphasis"]) == {"best"}
    tex_out = tmp_path / "tex"
    assert main(["report", str(nine), "--out", str(tex_out)]) == 0
    lines = next(tex_out.glob("*.tex")).read_text().splitlines()
    after = [lines[i + 1] for i, line in enumerate(lines) if "Zero-shot (reference)" in line]
    assert len(after) == 3 and all(line.startswith("\\cmidrule") for line in after)


@pytest.mark.parametrize("width", ["wide", "12", "\\foo"])
def test_bad_width_is_one_line(nine: Path, tmp_path: Path, capsys, width: str) -> None:
    err = _one_line_error(capsys, main(["report", str(nine), "--width", width, "--out", str(tmp_path / "rep")]))
    assert "--width" in err
    assert not (tmp_path / "rep").exists()
