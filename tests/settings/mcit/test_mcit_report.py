"""``clbench report`` on MCIT result folders the test writes: hand-made matrices, numbers computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from clbench.cli.app import main

TASKS = ["a", "b", "c"]
# rows: after training task a, b, c; columns: tasks a, b, c (percent)
LORA0 = [[80, 10, 20], [60, 70, 30], [50, 40, 90]]
LORA1 = [[82, 12, 22], [62, 72, 32], [52, 42, 92]]
KEEP0 = [[80, 20, 30], [78, 75, 40], [77, 72, 88]]
# by hand: MFT = mean diag, MFN = mean last row, MAA = mean over t of the mean of row t's first t+1 cells,
# BWT = mean over i<T of (last row - diag), Transfer = mean over i>=2 of the mean of column i above the diagonal
HAND = {
    "LORA0": {"mft": 80.0, "mfn": 60.0, "maa": (80 + 65 + 60) / 3, "bwt": -30.0, "transfer": (10 + 25) / 2},
    "LORA1": {"mft": 82.0, "mfn": 62.0, "maa": (82 + 67 + 62) / 3, "bwt": -30.0, "transfer": (12 + 27) / 2},
    "KEEP0": {"mft": 81.0, "mfn": 79.0, "maa": (80 + 76.5 + 79) / 3, "bwt": -3.0, "transfer": (20 + 35) / 2},
}


def write_run(out: Path, method: str, seed: int, rows, metrics: dict, *, status: str = "complete",
              hparams: dict | None = None, preset: str = "smoke") -> Path:
    folder = out / "synthetic-mcit-order1" / method / f"seed{seed}"
    folder.mkdir(parents=True)
    frame = pd.DataFrame(rows, columns=TASKS)
    frame.insert(0, "trained_on", TASKS)
    frame.to_csv(folder / "accuracy.csv", index=False)
    pd.DataFrame([[30.0, 20.0, 10.0]], columns=TASKS).to_csv(folder / "base.csv", index=False)
    pd.DataFrame({"task": [0, 1, 2], "section": ["train"] * 3, "seconds": [1.0, 2.0, 3.0],
                  "peak_bytes": [2**20] * 3}).to_csv(folder / "profile.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps({**metrics, "setting": "mcit"}))
    (folder / "manifest.json").write_text(json.dumps({
        "setting": "mcit", "benchmark": "synthetic-mcit", "method": method, "seed": seed, "preset": preset,
        "hparams": hparams or {"rank": 8}, "loop": {"epochs": [1]}, "backbone": "tiny", "tasks": TASKS,
        "status": status}))
    return folder


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    write_run(out, "lora", 0, LORA0, HAND["LORA0"])
    write_run(out, "lora", 1, LORA1, HAND["LORA1"])
    write_run(out, "keeplora", 0, KEEP0, HAND["KEEP0"])
    return out


def test_csv_has_mcitlib_columns_and_hand_numbers(results: Path, tmp_path: Path) -> None:
    assert main(["report", str(results), "--format", "csv", "--out", str(tmp_path / "rep")]) == 0
    frame = pd.read_csv(tmp_path / "rep" / "synthetic-mcit.csv")
    cell = frame.set_index(["method", "column"])
    assert list(frame[frame["method"] == "LoRA"]["column"]) == ["a", "b", "c", "MFT", "MFN", "MAA", "BWT", "Transfer"]
    assert cell.loc[("LoRA", "MFT"), "mean"] == pytest.approx(81.0)
    assert cell.loc[("LoRA", "MFT"), "std"] == pytest.approx(2**0.5, abs=1e-4)  # sample std of 80, 82
    assert cell.loc[("LoRA", "MAA"), "mean"] == pytest.approx(((80 + 65 + 60) / 3 + (82 + 67 + 62) / 3) / 2, abs=1e-4)
    assert cell.loc[("LoRA", "BWT"), "std"] == pytest.approx(0.0)
    assert cell.loc[("LoRA", "Transfer"), "mean"] == pytest.approx(18.5)
    assert cell.loc[("LoRA", "c"), "mean"] == pytest.approx(91.0)  # final score of task c: (90 + 92) / 2
    assert cell.loc[("KeepLoRA", "MFN"), "mean"] == pytest.approx(79.0)
    assert pd.isna(cell.loc[("KeepLoRA", "MFN"), "std"])  # one seed
    assert cell.loc[("KeepLoRA", "BWT"), "emphasis"] == "best" and pd.isna(cell.loc[("LoRA", "BWT"), "emphasis"])
    assert cell.loc[("KeepLoRA", "MFT"), "emphasis"] == "best" == cell.loc[("LoRA", "MFT"), "emphasis"]  # a tie


def test_markdown_and_latex_label_as_mcitlib(results: Path, capsys) -> None:
    assert main(["report", str(results), "--format", "markdown", "--out", "-"]) == 0
    md = capsys.readouterr().out
    header = md.splitlines()[0]
    assert header == "| Method | a | b | c | MFT | MFN | MAA | BWT | Transfer |"
    lora = next(line for line in md.splitlines() if line.startswith("| LoRA (2 seeds)"))
    assert "81.0 ± 1.4" in lora and "-30.0 ± 0.0" in lora
    keep = next(line for line in md.splitlines() if line.startswith("| KeepLoRA (1 seed)"))
    assert "**-3.0**" in keep and "**79.0**" in keep and "**27.5**" in keep
    assert main(["report", str(results), "--format", "latex", "--out", "-"]) == 0
    tex = capsys.readouterr().out
    assert "MFT & MFN & MAA & BWT & Transfer" in tex and r"\textbf{-3.0}" in tex and r"\toprule" in tex


def test_figures_hold_the_full_matrix(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(results), "--format", "markdown", "--figures", "--costs", "--out", str(out)]) == 0
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"synthetic-mcit_matrix_lora_seed0.png", "synthetic-mcit_matrix_lora_seed1.png",
            "synthetic-mcit_matrix_keeplora_seed0.pdf"} <= names
    assert "train" in (out / "synthetic-mcit_costs.md").read_text()


def test_mixing_mcit_and_clip_runs_is_one_line(results: Path, tmp_path: Path, capsys) -> None:
    from fake_runs import write_fake_run

    clip = tmp_path / "clip"
    write_fake_run(clip, "lora", 0)
    rep = tmp_path / "rep"
    assert main(["report", str(results), str(clip), "--out", str(rep)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mix MCIT (LLaVA) runs" in err and len(err.splitlines()) == 1 and not rep.exists()


@pytest.mark.parametrize(("change", "needle"), [
    ("metrics", "disagrees with its accuracy.csv (MFT"),
    ("hparams", "different hyperparameters"),
    ("preset", "differ in preset"),
])
def test_inconsistent_runs_are_refused(tmp_path: Path, capsys, change: str, needle: str) -> None:
    out = tmp_path / "results"
    write_run(out, "lora", 0, LORA0, HAND["LORA0"])
    if change == "metrics":
        write_run(out, "lora", 1, LORA1, {**HAND["LORA1"], "mft": 90.0})
    elif change == "hparams":
        write_run(out, "lora", 1, LORA1, HAND["LORA1"], hparams={"rank": 16})
    else:
        write_run(out, "keeplora", 0, KEEP0, HAND["KEEP0"], preset="default")
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_unfinished_runs_are_skipped_with_a_warning(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    write_run(out, "lora", 0, LORA0, HAND["LORA0"])
    write_run(out, "keeplora", 0, KEEP0, HAND["KEEP0"], status="running")
    assert main(["report", str(out), "--format", "markdown", "--out", "-"]) == 0
    captured = capsys.readouterr()
    assert "KeepLoRA" not in captured.out and "skipping" in captured.err
