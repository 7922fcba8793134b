"""`clbench sweep`: grid expansion, deterministic ids, skipping finished runs, failures kept in their folders,
the launchers (local process pool, Ray, submitit) giving the same bytes, and `clbench report --sensitivity`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clbench.cli.app import main
from clbench.config import build_config, method_run_config, run_id
from clbench.errors import UserError
from clbench.storage.results import safe_component
from clbench.sweeps.plan import (
    DONE,
    NEW,
    REPLACE,
    RESUME,
    RETRY,
    SweepRequest,
    expand,
    folder_name,
    folder_run_id,
    parse_grid,
    record_failure,
    run_status,
    staged_folder,
)

FAST = ["--preset", "smoke", "--pretrained", "none", "--set", "data.num_tasks=2", "--quiet"]
# The acceptance sweep: 2 methods x 2 seeds x 2 grid values (each method's own rank axis) = 8 runs.
SWEEP = ["sweep", "--methods", "lora,keeplora", "--seeds", "0,1", "--grid", "lora.rank=2,4",
         "--grid", "keeplora.rank=2,4", *FAST]


def run_folders(out: Path) -> dict[str, Path]:
    """Run folders below ``out`` (by path relative to it), the sweep's staging area left out."""
    return {str(p.parent.relative_to(out)): p.parent for p in out.rglob("manifest.json") if ".sweep" not in p.parts}


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time: a rerun that executes nothing changes neither."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def inline_sweep(tmp_path_factory) -> Path:
    """The acceptance sweep, run in this process (the launcher cannot change results: other tests check that)."""
    out = tmp_path_factory.mktemp("sweep")
    assert main([*SWEEP, "--out", str(out), "--launcher", "inline"]) == 0
    return out


def request(tmp_path: Path, methods=("lora", "keeplora"), seeds=(0, 1), grid=(), sets=("data.num_tasks=2",)):
    axes = parse_grid(list(grid), list(methods))
    options = (("benchmark", "synthetic"), ("pretrained", "none"))
    return SweepRequest(tuple(methods), (1,), tuple(seeds), axes, "smoke", options, tuple(sets), str(tmp_path))


# ---- planning: no run executes ---------------------------------------------------------------------------
def test_method_axis_multiplies_only_its_method(tmp_path: Path) -> None:
    specs = expand(request(tmp_path, grid=["keeplora.rank=4,8"]))
    lora = [s for s in specs if s.method == "lora"]
    keep = [s for s in specs if s.method == "keeplora"]
    assert len(lora) == 2 and len(keep) == 4  # 2 seeds; 2 seeds x 2 ranks
    assert {Path(s.folder).parent.name for s in lora} == {"lora"}  # the plain folder `clbench run` writes
    assert {Path(s.folder).parent.name for s in keep} == {"keeplora,rank=4", "keeplora,rank=8"}
    assert len({s.id for s in specs}) == len({s.folder for s in specs}) == 6


def test_global_axis_multiplies_every_method(tmp_path: Path) -> None:
    specs = expand(request(tmp_path, grid=["train.lr=1e-3,5e-4", "keeplora.eps_f=0.9,0.99"]))
    assert sum(s.method == "lora" for s in specs) == 2 * 2 and sum(s.method == "keeplora" for s in specs) == 2 * 2 * 2
    assert "keeplora,train.lr=5e-4,eps_f=0.9" in {Path(s.folder).parent.name for s in specs}


def test_id_is_run_id_of_the_resolved_config(tmp_path: Path) -> None:
    """Brute force: each id equals run_id(method_run_config(...)) of the config the same options resolve to."""
    specs = expand(request(tmp_path, grid=["keeplora.rank=4,8", "train.lr=1e-3,5e-4"],
                           sets=("data.num_tasks=2", "lora.alpha=2", "keeplora.eps_f=0.95")))
    for s in specs:
        lr = dict(s.point)["train.lr"]
        sets = ["data.num_tasks=2", f"train.lr={lr}"]
        if s.method == "lora":
            sets += ["lora.alpha=2"]
        else:
            sets += ["keeplora.eps_f=0.95", f"keeplora.rank={dict(s.point)['rank']}"]
        cfg = build_config("smoke", {"benchmark": "synthetic", "pretrained": "none", "order": 1, "seed": s.seed},
                           sets, ["lora", "keeplora"])
        resolved = method_run_config(cfg, s.method)
        assert s.id == run_id(resolved)
        assert resolved["train"]["lr"] == float(lr)
        if s.method == "keeplora":
            assert resolved["hparams"]["rank"] == int(dict(s.point)["rank"])
            assert resolved["hparams"]["eps_f"] == 0.95


def test_folder_names_are_safe_and_distinct() -> None:
    name = folder_name("keeplora++", (("rank", "8"), ("eps_f", "0.9")))
    assert name == "keeplora++,rank=8,eps_f=0.9" and safe_component(name, "x") == name
    odd = [folder_name("lora", (("data_root", v),)) for v in ("/data/a b", "/data/a c", "x" * 300)]
    assert all(n.startswith("lora,grid-") and safe_component(n, "x") == n for n in odd)
    assert len(set(odd)) == 3


@pytest.mark.parametrize("args, message", [
    (["--grid", "lora.rnk=1,2"], "lora has no hyperparameter 'rnk'"),
    (["--grid", "zscl.lam=1,2"], "not in --methods"),
    (["--grid", "seed=0,1"], "use --seeds"),
    (["--grid", "lora.rank=4,4"], "repeats a value"),
    (["--grid", "lora.rank=4,04"], "give the same configuration"),
    (["--grid", "train.lr=1e-3", "--grid", "lora.train.lr=1e-3"], "both set train.lr"),
    (["--grid", "lora.rank=4,8", "--set", "lora.rank=2"], "both in --set and --grid"),
    (["--grid", "lora.rank"], "expected key=v1,v2"),
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--launcher", "dask"], "not one of"),
    (["--launcher", "slurm"], "needs --time"),
    (["--launcher", "local", "--gpus-per-job", "1"], "for --launcher ray or slurm"),
    (["--shots", "4"], "--shots is for real datasets"),
    (["--skip-bad-images"], "--skip-bad-images is for real datasets"),
    (["--shots", "4", "--grid", "data.shots=2,8", "--benchmark", "mtil"], "both in --set and --grid"),
])
def test_user_mistakes_are_one_line_errors(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert main(["sweep", "--methods", "lora", *FAST, "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run_folders(tmp_path)


@pytest.mark.parametrize("launcher, extra, args", [("ray", "clbench[ray]", []),
                                                    ("slurm", "clbench[slurm]", ["--time", "10"])])
def test_missing_extra_names_the_install_command(tmp_path: Path, capsys, without_launcher_extras, launcher, extra,
                                                   args) -> None:
    assert main(["sweep", "--methods", "lora", *FAST, "--out", str(tmp_path), "--launcher", launcher, *args]) == 2
    err = capsys.readouterr().err
    assert f"pip install '{extra}'" in err and "Traceback" not in err
    assert not run_folders(tmp_path)


def test_status_of_existing_folders(tmp_path: Path) -> None:
    """done only for a complete run of the same configuration; a staged checkpoint means resume."""
    spec, other = expand(request(tmp_path, methods=("lora",), seeds=(0,), grid=["lora.rank=2,4"]))
    assert run_status(spec) == NEW
    folder = Path(spec.folder)
    folder.mkdir(parents=True)
    cfg = build_config("smoke", dict(spec.options), list(spec.sets), ["lora"])
    config = {**method_run_config(cfg, "lora"), "datasets": ["a", "b"]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "manifest.json").write_text(json.dumps({"status": "complete"}))
    assert folder_run_id(folder) == spec.id and run_status(spec) == REPLACE  # "complete" without its files
    (folder / "accuracy.csv").write_text("trained_on,a,b\na,50,40\nb,45,60\n")
    (folder / "zeroshot.csv").write_text("trained_on,a,b\nzeroshot,30,20\n")
    (folder / "profile.csv").write_text("task,section,seconds,peak_bytes\n0,train,1.0,0\n")
    (folder / "metrics.json").write_text(json.dumps({"last": 52.5}))
    assert run_status(spec) == DONE
    (folder / "config.json").write_text(json.dumps({**config, "hparams": {**config["hparams"], "rank": 3}}))
    assert run_status(spec) == REPLACE
    (folder / "manifest.json").write_text(json.dumps({"status": "failed"}))
    assert run_status(spec) == RETRY
    staged = staged_folder(spec)
    staged.mkdir(parents=True)
    (staged / "resume.safetensors").write_bytes(b"x")
    (staged / "manifest.json").write_text(json.dumps({"status": "running", "run_id": "r"}))
    assert run_status(spec) == RESUME
    # a worker that died after a task: the failure is recorded in the folder, the checkpoint stays staged
    report = record_failure(spec, "the run's process ended abnormally: killed")
    assert report.status == "failed" and Path(report.folder) == folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "killed" in manifest["error"]
    assert "killed" in (folder / "error.txt").read_text() and not (folder / "resume.safetensors").exists()
    assert (staged / "resume.safetensors").exists() and run_status(spec) == RESUME
    assert run_status(other) == NEW


def test_failure_leaves_a_locked_staged_run_alone(tmp_path: Path) -> None:
    """Another process's run of the same id (its lock in the staged folder) is not moved or deleted."""
    (spec,) = expand(request(tmp_path, methods=("lora",), seeds=(0,)))
    staged = staged_folder(spec)
    staged.mkdir(parents=True)
    for name in ("run.lock", "manifest.json", "accuracy.csv"):
        (staged / name).write_text("{}")
    record_failure(spec, "lora: in use by another clbench run")
    assert sorted(p.name for p in staged.iterdir()) == ["accuracy.csv", "manifest.json", "run.lock"]
    folder = Path(spec.folder)
    assert json.loads((folder / "manifest.json").read_text())["status"] == "failed"
    assert not (folder / "accuracy.csv").exists()


def test_live_view_counts(tmp_path: Path) -> None:
    from rich.console import Console

    from clbench.cli.sweep import SweepView
    from clbench.sweeps.plan import STARTED, RunReport

    specs = expand(request(tmp_path, methods=("lora",), seeds=(0, 1, 2)))
    view = SweepView(specs, skipped=4, failed=[], quiet=True, console=Console(file=None, quiet=True))
    assert view.counts() == {"queued": 3, "running": 0, "done": 0, "failed": 0, "skipped": 4}
    specs[0].staging.mkdir(parents=True)
    (specs[0].staging / STARTED).write_text("{}")
    view.tick()
    assert view.counts() == {"queued": 2, "running": 1, "done": 0, "failed": 0, "skipped": 4}
    view.finished(RunReport(specs[0].id, "complete", specs[0].folder))
    view.finished(RunReport(specs[1].id, "failed", specs[1].folder, error="boom"))
    assert view.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 1, "skipped": 4}
    shown = Console(record=True, width=200)
    shown.print(view.render())
    assert "1 queued · 0 running · 1 done · 1 failed · 4 already done" in shown.export_text()


# ---- the acceptance sweep ----------------------------------------------------------------------------------
def test_sweep_writes_eight_folders_with_distinct_ids(inline_sweep: Path, capsys) -> None:
    folders = run_folders(inline_sweep)
    expected = {f"synthetic-order1/{m},rank={r}/seed{s}" for m in ("lora", "keeplora") for r in (2, 4) for s in (0, 1)}
    assert set(folders) == expected
    ids = set()
    for rel, folder in folders.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        sweep = json.loads((folder / "sweep.json").read_text())
        assert manifest["status"] == "complete"
        rank = int(rel.split("rank=")[1].split("/")[0])
        assert config["hparams"]["rank"] == rank and sweep["grid"] == {"rank": str(rank)}  # the value was applied
        assert config["method"] == manifest["method"] == rel.split("/")[1].split(",")[0]
        assert sweep["run_id"] == folder_run_id(folder)
        ids.add(sweep["run_id"])
    assert len(ids) == 8
    assert not (inline_sweep / ".sweep").exists()
    assert main([*SWEEP, "--out", str(inline_sweep), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert all(i in listed for i in ids) and listed.count("done (skip)") == 8


def test_rerun_executes_nothing_and_deleting_one_reruns_only_it(inline_sweep: Path, tmp_path: Path,
                                                                 count_runs: list[str], capsys) -> None:
    out = tmp_path / "results"
    shutil.copytree(inline_sweep, out)
    before = snapshot(out)
    assert main([*SWEEP, "--out", str(out), "--launcher", "inline"]) == 0
    assert count_runs == [] and snapshot(out) == before
    assert "8 already done" in capsys.readouterr().out
    victim = out / "synthetic-order1" / "keeplora,rank=4" / "seed1"
    shutil.rmtree(victim)
    assert main([*SWEEP, "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would run (new)") == 1
    assert main([*SWEEP, "--out", str(out), "--launcher", "inline"]) == 0
    assert count_runs == [json.loads((victim / "sweep.json").read_text())["run_id"]]
    after = snapshot(out)
    untouched = {k: v for k, v in before.items() if not k.startswith("synthetic-order1/keeplora,rank=4/seed1/")}
    assert {k: after[k] for k in untouched} == untouched
    for name in ("accuracy.csv", "zeroshot.csv", "metrics.json"):  # same seed and config: the same numbers
        assert after[f"synthetic-order1/keeplora,rank=4/seed1/{name}"][0] == before[
            f"synthetic-order1/keeplora,rank=4/seed1/{name}"][0]


def test_failed_runs_keep_their_error_and_the_others_complete(inline_sweep: Path, tmp_path: Path, capsys) -> None:
    """Local launcher (each run in its own process): rank 0 is rejected by the config, rank 4096 by the run
    (wider than the tiny backbone); rank 2 completes with the same bytes as the in-process sweep."""
    args = ["sweep", "--methods", "lora", "--seeds", "0", "--grid", "lora.rank=0,2,4096", *FAST,
            "--out", str(tmp_path), "--launcher", "local", "--jobs", "2"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "1 complete, 2 failed" in captured.out
    base = tmp_path / "synthetic-order1"
    for rank, message in (("0", "out of range"), ("4096", "exceeds the width")):
        folder = base / f"lora,rank={rank}" / "seed0"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "failed" and message in manifest["error"]
        assert message in (folder / "error.txt").read_text()
        assert f"lora,rank={rank} order1 seed0" in captured.err and message in captured.err
    good = base / "lora,rank=2" / "seed0"
    assert json.loads((good / "manifest.json").read_text())["status"] == "complete"
    assert (good / "sweep.log").exists()  # the worker's output went to the run's log
    reference = inline_sweep / "synthetic-order1" / "lora,rank=2" / "seed0"
    for name in ("accuracy.csv", "zeroshot.csv"):
        assert (good / name).read_bytes() == (reference / name).read_bytes()


# ---- engines: identical results to the in-process launcher ----------------------------------------------
def _same_results(out: Path, reference: Path, folders: list[str]) -> None:
    for rel in folders:
        for name in ("accuracy.csv", "zeroshot.csv", "config.json"):
            assert (out / rel / name).read_bytes() == (reference / rel / name).read_bytes(), (rel, name)


@pytest.mark.slow
def test_ray_launcher_matches_local(inline_sweep: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'clbench[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main([*SWEEP, "--out", str(tmp_path), "--launcher", "ray", "--cpus-per-job", "1"]) == 0
    finally:
        ray.shutdown()
    assert set(run_folders(tmp_path)) == set(run_folders(inline_sweep))
    _same_results(tmp_path, inline_sweep, list(run_folders(inline_sweep)))


@pytest.mark.slow
def test_submitit_local_executor_matches_local(inline_sweep: Path, tmp_path: Path) -> None:
    pytest.importorskip("submitit", reason="submitit is an optional extra: pip install 'clbench[slurm]'")
    args = ["sweep", "--methods", "lora", "--seeds", "0", "--grid", "lora.rank=2,4", *FAST, "--out", str(tmp_path),
            "--launcher", "slurm", "--submitit-cluster", "local", "--time", "10", "--jobs", "2"]
    assert main(args) == 0
    _same_results(tmp_path, inline_sweep, [f"synthetic-order1/lora,rank={r}/seed0" for r in (2, 4)])
    assert any((tmp_path / ".sweep" / "slurm").rglob("*_log.out"))  # submitit's own logs, kept apart


# ---- report --sensitivity ----------------------------------------------------------------------------------
def _fake_sweep(root: Path) -> list[Path]:
    from fake_runs import write_fake_run

    folders = []
    for i, (rank, eps, seed) in enumerate((r, e, s) for r in (4, 8) for e in (0.9, 0.99, 0.95) for s in (0, 1)):
        folders.append(write_fake_run(root / f"k{i}", "keeplora", seed, hparams={"rank": rank, "eps_f": eps},
                                      rng_seed=100 + i))
    folders.append(write_fake_run(root / "lora", "lora", 0, hparams={"rank": 4}, rng_seed=7))
    return folders


def test_sensitivity_table_is_mean_and_std_over_seeds(tmp_path: Path) -> None:
    _fake_sweep(tmp_path / "runs")
    assert main(["report", str(tmp_path / "runs"), "--sensitivity", "keeplora.eps_f", "--format", "csv",
                 "--out", str(tmp_path / "rep")]) == 0
    table = pd.read_csv(tmp_path / "rep" / "synthetic-order1_sensitivity_keeplora.eps_f.csv")
    assert list(table["series"]) == ["KeepLoRA (rank=4)"] * 3 + ["KeepLoRA (rank=8)"] * 3  # lora is not swept
    assert list(table["value"]) == [0.9, 0.95, 0.99] * 2  # sorted by value
    for row in table.itertuples():
        metrics = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("metrics.json")
                   if (cfg := json.loads((p.parent / "config.json").read_text()))["method"] == "keeplora"
                   and cfg["hparams"] == {"rank": int(row.series[-2]), "eps_f": row.value}]
        assert row.seeds == len(metrics) == 2
        for key in ("transfer", "average", "last"):
            values = np.array([m[key] for m in metrics])
            assert getattr(row, f"{key}_mean") == pytest.approx(values.mean(), abs=1e-4)
            assert getattr(row, f"{key}_std") == pytest.approx(values.std(ddof=1), abs=1e-4)


def test_sensitivity_markdown_latex_and_figure(tmp_path: Path) -> None:
    _fake_sweep(tmp_path / "runs")
    for fmt, ext in (("markdown", "md"), ("latex", "tex")):
        assert main(["report", str(tmp_path / "runs"), "--sensitivity", "keeplora.rank", "--format", fmt,
                     "--out", str(tmp_path / fmt), *(["--figures"] if fmt == "latex" else [])]) == 0
        text = (tmp_path / fmt / f"synthetic-order1_sensitivity_keeplora.rank.{ext}").read_text()
        assert "KeepLoRA (eps" in text and ("±" in text if fmt == "markdown" else r"$\pm$" in text)
    figures = tmp_path / "latex" / "figures"
    assert (figures / "synthetic-order1_sensitivity_keeplora.rank.png").read_bytes()[:4] == b"\x89PNG"
    assert (figures / "synthetic-order1_sensitivity_keeplora.rank.pdf").read_bytes()[:4] == b"%PDF"


@pytest.mark.parametrize("key, message", [("keeplora.nope", "has no hyperparameter"),
                                          ("zscl.temperature", "no complete zscl runs")])
def test_sensitivity_errors(tmp_path: Path, capsys, key: str, message: str) -> None:
    _fake_sweep(tmp_path / "runs")
    assert main(["report", str(tmp_path / "runs"), "--sensitivity", key, "--out", str(tmp_path / "rep")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_sensitivity_of_a_real_sweep(inline_sweep: Path, tmp_path: Path) -> None:
    assert main(["report", str(inline_sweep / "synthetic-order1"), "--sensitivity", "lora.rank", "--format", "csv",
                 "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "synthetic-order1_sensitivity_lora.rank.csv")
    assert list(table["value"]) == [2, 4] and list(table["seeds"]) == [2, 2]
    metrics = json.loads((inline_sweep / "synthetic-order1" / "lora,rank=2" / "seed0" / "metrics.json").read_text())
    other = json.loads((inline_sweep / "synthetic-order1" / "lora,rank=2" / "seed1" / "metrics.json").read_text())
    assert table["last_mean"][0] == pytest.approx((metrics["last"] + other["last"]) / 2, abs=1e-4)


def test_same_grid_key_twice_is_an_error() -> None:
    with pytest.raises(UserError, match="given twice"):
        parse_grid(["lora.rank=1", "lora.rank=2"], ["lora"])
