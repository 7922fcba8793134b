"""``clbench sweep`` on the MCIT setting: grid points as folders, complete runs skipped, one-line refusals, and a
report whose rows are the grid points."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason="the MCIT setting needs transformers (pip install 'clbench[mcit]')")

from clbench.cli import main  # noqa: E402

SMOKE = ["--benchmark", "synthetic-mcit", "--preset", "smoke", "--set", "data.n_train=8", "--set", "data.n_test=2"]


@pytest.mark.slow
def test_grid_points_run_once_and_report_as_rows(tmp_path, capsys) -> None:
    out = tmp_path / "results"
    args = ["sweep", "--methods", "lora", "--grid", "lora.rank=2,4", "--out", str(out), "--quiet", *SMOKE]
    assert main(args) == 0
    group = out / "synthetic-mcit-order1"
    assert sorted(p.name for p in group.iterdir()) == ["lora,rank=2", "lora,rank=4"]
    for rank in (2, 4):
        manifest = json.loads((group / f"lora,rank={rank}" / "seed0" / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["hparams"]["rank"] == rank
    stamp = {p: p.stat().st_mtime_ns for p in group.rglob("accuracy.csv")}
    capsys.readouterr()
    assert main(args) == 0  # the same sweep again: both runs are complete, nothing reruns
    assert capsys.readouterr().out.count("skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in group.rglob("accuracy.csv")} == stamp
    assert main(["report", str(out), "--format", "markdown", "--out", "-"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| LoRA")]
    assert [r.split("|")[1].strip() for r in rows] == ["LoRA (rank=2) (1 seed)", "LoRA (rank=4) (1 seed)"]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--orders", "1,2"], "--orders belong to CLIP sweeps"),
    (["--launcher", "ray"], "--launcher belong to CLIP sweeps"),
    (["--grid", "zscl.rank=1"], "'zscl' is not in --methods"),
    (["--grid", "lora.nope=1,2"], "has no hyperparameter 'nope'"),
    (["--grid", "lora.rank=2,x"], "not a valid value"),
    (["--grid", "loop.nope=1"], "loop has no setting 'nope'"),
    (["--methods", "inflora"], "no LLaVA form"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, extra, needle) -> None:
    methods = [] if "--methods" in extra else ["--methods", "lora"]
    rc = main(["sweep", *methods, *extra, "--out", str(tmp_path / "o"), *SMOKE])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
