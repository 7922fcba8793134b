"""``clbench sweep`` on the MCIT setting: grid points as folders, complete runs skipped, one-line refusals, a
report whose rows are the grid points, and the CLIP sweep machinery shared (``--dry-run``, the launchers, skip and
resume from the staging folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the MCIT setting needs transformers (pip install 'clbench[mcit]')")

from clbench.cli.app import main  # noqa: E402

SMOKE = ["--benchmark", "synthetic-mcit", "--preset", "smoke", "--set", "data.n_train=8", "--set", "data.n_test=2"]
# The tiniest runs: two training items, one test item and one generated token per task (about a second a run).
TINY = ["--benchmark", "synthetic-mcit", "--preset", "smoke", "--set", "data.n_train=2", "--set", "data.n_test=1",
        "--set", "loop.max_new_tokens=1", "--set", "loop.batch_size=2", "--quiet"]
TWO = ["sweep", "--methods", "lora,keeplora", "--seeds", "0", *TINY]  # one lora run and one keeplora run
COMPARED = ("accuracy.csv", "base.csv", "metrics.json", "config.json")  # metrics.json holds the training losses


@pytest.mark.slow
def test_grid_points_run_once_and_report_as_rows(tmp_path, capsys) -> None:
    out = tmp_path / "results"
    args = ["sweep", "--methods", "lora", "--grid", "lora.rank=2,4", "--out", str(out), "--quiet", "--launcher",
            "inline", *SMOKE]
    assert main(args) == 0
    group = out / "synthetic-mcit-order1"
    assert sorted(p.name for p in group.iterdir()) == ["lora,rank=2", "lora,rank=4"]
    for rank in (2, 4):
        manifest = json.loads((group / f"lora,rank={rank}" / "seed0" / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["hparams"]["rank"] == rank
    stamp = {p: p.stat().st_mtime_ns for p in group.rglob("accuracy.csv")}
    capsys.readouterr()
    assert main(args) == 0  # the same sweep again: both runs are complete, nothing reruns
    assert "0 complete, 0 failed, 2 already done (skipped)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in group.rglob("accuracy.csv")} == stamp
    assert main(["report", str(out), "--format", "markdown", "--out", "-"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| LoRA")]
    assert [r.split("|")[1].strip() for r in rows] == ["LoRA (rank=2) (1 seed)", "LoRA (rank=4) (1 seed)"]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--orders", "1,2"], "--orders belong to CLIP sweeps"),
    (["--eval", "union", "--precision", "amp"], "--eval, --precision belong to CLIP sweeps"),
    (["--launcher", "dask"], "not one of"),
    (["--launcher", "slurm"], "needs --time"),
    (["--launcher", "local", "--gpus-per-job", "1"], "for --launcher ray or slurm"),
    (["--launcher", "inline", "--time", "10"], "need --launcher slurm"),
    (["--grid", "zscl.rank=1"], "'zscl' is not in --methods"),
    (["--grid", "lora.nope=1,2"], "has no hyperparameter 'nope'"),
    (["--grid", "lora.rank=2,x"], "'x' is not a valid int"),
    (["--grid", "lora.rank=0,2"], "lora.rank=0 is out of range"),
    (["--set", "loop.warmup=1.5"], "loop.warmup=1.5 is out of range"),
    (["--grid", "loop.nope=1"], "loop has no setting 'nope'"),
    (["--methods", "inflora"], "no LLaVA form"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, extra, needle) -> None:
    methods = [] if "--methods" in extra else ["--methods", "lora"]
    rc = main(["sweep", *methods, *extra, "--out", str(tmp_path / "o"), *SMOKE])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ---- the CLIP sweep machinery on MCIT runs ---------------------------------------------------------------------
def run_folders(out: Path) -> dict[str, Path]:
    return {str(p.parent.relative_to(out)): p.parent for p in out.rglob("manifest.json") if ".sweep" not in p.parts}


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def same_results(out: Path, reference: Path, folders) -> None:
    for rel in folders:
        for name in COMPARED:
            assert (out / rel / name).read_bytes() == (reference / rel / name).read_bytes(), (rel, name)


@pytest.fixture(scope="module")
def inline_sweep(tmp_path_factory) -> Path:
    """One lora and one keeplora run in this process (pre-trains the session's tiny LLaVA first)."""
    out = tmp_path_factory.mktemp("mcit-sweep")
    assert main([*TWO, "--out", str(out), "--launcher", "inline"]) == 0
    return out


def test_dry_run_lists_every_run_and_writes_nothing(tmp_path, capsys) -> None:
    """The brief's SLURM command on a fake UCIT tree: 2 seeds x (lora + keeplora at two ranks), nothing run."""
    from fake_mcit import write_fake

    data = write_fake(tmp_path / "UCIT", "ucit")
    out = tmp_path / "results"
    before = sorted(tmp_path.rglob("*"))
    assert main(["sweep", "--methods", "lora,keeplora", "--benchmark", "ucit", "--data-root", str(data),
                 "--backbone", str(tmp_path / "llava"), "--seeds", "0,1", "--grid", "keeplora.rank=4,8",
                 "--launcher", "slurm", "--partition", "gpu", "--time", "12:00:00", "--gpus-per-job", "1",
                 "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before and not out.exists()
    assert text.splitlines()[0] == f"sweep: 6 runs in {out}: 6 to run, 0 done, 0 invalid"
    rows = [line.split() for line in text.splitlines()[2:8]]
    assert [(r[1], r[3], r[4]) for r in rows] == [("lora", "0", "-"), ("keeplora", "0", "rank=4"),
                                                  ("keeplora", "0", "rank=8"), ("lora", "1", "-"),
                                                  ("keeplora", "1", "rank=4"), ("keeplora", "1", "rank=8")]
    assert all(" ".join(r[5:]) == "would run (new)" for r in rows) and len({r[0] for r in rows}) == 6
    folders = [line.split()[1] for line in text.split("folders:\n")[1].splitlines()]
    assert folders == [f"ucit-order1/{m}/seed{s}" for s in (0, 1)
                       for m in ("lora", "keeplora,rank=4", "keeplora,rank=8")]


def test_local_launcher_matches_inline(inline_sweep, tmp_path, capsys) -> None:
    """Each run in a process of its own (two at once): the same bytes as the in-process sweep."""
    assert main([*TWO, "--out", str(tmp_path), "--launcher", "local", "--jobs", "2"]) == 0
    assert "2 complete, 0 failed, 0 already done" in capsys.readouterr().out
    assert set(run_folders(tmp_path)) == set(run_folders(inline_sweep)) == \
        {"synthetic-mcit-order1/lora/seed0", "synthetic-mcit-order1/keeplora/seed0"}
    same_results(tmp_path, inline_sweep, run_folders(inline_sweep))
    for folder in run_folders(tmp_path).values():
        assert (folder / "sweep.log").exists()  # the worker's output went to the run's log
        assert json.loads((folder / "sweep.json").read_text())["run_id"] == \
            json.loads((folder / "manifest.json").read_text())["run_id"]
    assert not (tmp_path / ".sweep").exists()


def test_reissued_sweep_skips_complete_runs(inline_sweep, tmp_path, count_runs, capsys) -> None:
    out = tmp_path / "results"
    shutil.copytree(inline_sweep, out)
    before = snapshot(out)
    assert main([*TWO, "--out", str(out), "--launcher", "inline"]) == 0
    assert count_runs == [] and snapshot(out) == before
    assert "2 runs: 0 complete, 0 failed, 2 already done (skipped)" in capsys.readouterr().out
    assert main([*TWO, "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("done (skip)") == 2
    victim = out / "synthetic-mcit-order1" / "keeplora" / "seed0"
    shutil.rmtree(victim)
    assert main([*TWO, "--out", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.count("would run (new)") == 1 and plan.count("done (skip)") == 1
    assert main([*TWO, "--out", str(out), "--launcher", "inline"]) == 0
    assert count_runs == [json.loads((victim / "sweep.json").read_text())["run_id"]]
    same_results(out, inline_sweep, run_folders(inline_sweep))
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k.startswith("synthetic-mcit-order1/lora/")} == \
        {k: v for k, v in before.items() if k.startswith("synthetic-mcit-order1/lora/")}


def test_run_failed_after_a_task_resumes_from_staging(inline_sweep, tmp_path, monkeypatch, capsys) -> None:
    """A crash after task 2 is recorded in the run's folder, its checkpoint stays staged, the dry run says resume,
    and the re-issued sweep finishes it with the numbers of the uninterrupted run."""
    import clbench.settings.mcit.runner as runner

    real = runner.run_sequence

    def crashing(*args, on_task_end=None, **kwargs):
        def end(state):
            on_task_end(state)
            if len(state["matrix"]) == 2:
                raise RuntimeError("node lost")
        return real(*args, on_task_end=end, **kwargs)

    args = ["sweep", "--methods", "lora", *TINY, "--out", str(tmp_path), "--launcher", "inline"]
    monkeypatch.setattr(runner, "run_sequence", crashing)
    assert main(args) == 1
    folder = tmp_path / "synthetic-mcit-order1" / "lora" / "seed0"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "node lost" in manifest["error"]
    assert "node lost" in (folder / "error.txt").read_text() and list(tmp_path.glob(".sweep/runs/*/out/**/resume.*"))
    monkeypatch.setattr(runner, "run_sequence", real)
    capsys.readouterr()
    assert main([*args[:-2], "--dry-run"]) == 0
    assert "would run (resume (after a crash))" in capsys.readouterr().out
    assert main(args) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"][0]["after_task"] == 2
    for name in ("accuracy.csv", "base.csv"):
        assert (folder / name).read_bytes() == (inline_sweep / "synthetic-mcit-order1/lora/seed0" / name).read_bytes()
    assert not (tmp_path / ".sweep").exists()


@pytest.mark.parametrize("launcher, extra, args", [("ray", "clbench[ray]", []),
                                                    ("slurm", "clbench[slurm]", ["--time", "10"])])
def test_missing_extra_names_the_install_command(tmp_path, capsys, without_launcher_extras, launcher, extra,
                                                   args) -> None:
    assert main(["sweep", "--methods", "lora", *TINY, "--out", str(tmp_path / "o"), "--launcher", launcher,
                 *args]) == 2
    err = capsys.readouterr().err
    assert f"pip install '{extra}'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# The Ray launcher calls the same clbench.sweeps.plan.execute_run as the two launchers below; its own plumbing is
# tested on CLIP specs (tests/sweeps/test_sweep.py::test_ray_launcher_matches_local). An MCIT copy of that test took
# 7 minutes on the 2-core CI machine (Ray workers importing torch and transformers) and was dropped.


@pytest.mark.slow
def test_submitit_local_executor_matches_inline(inline_sweep, tmp_path) -> None:
    pytest.importorskip("submitit", reason="submitit is an optional extra: pip install 'clbench[slurm]'")
    assert main([*TWO, "--out", str(tmp_path), "--launcher", "slurm", "--submitit-cluster", "local", "--time", "10",
                 "--jobs", "2"]) == 0
    same_results(tmp_path, inline_sweep, run_folders(inline_sweep))
    assert any((tmp_path / ".sweep" / "slurm").rglob("*_log.out"))  # submitit's own logs, kept apart
