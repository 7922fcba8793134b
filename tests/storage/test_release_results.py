"""Results written by a release still load, resume and report with the code of this checkout.

Each ``tests/data/release-<version>/`` folder was written by that release's code
(``tests/data/make_release_results.py``; its README names the commit and the commands). On a copy of it:

- ``clbench report`` makes its tables from the stored runs, and every number equals the one recomputed here from
  the stored accuracy matrix (MTIL Transfer / Average / Last after ZSCL, Zheng et al., ICCV 2023; MCITlib's MFT /
  MFN / MAA / BWT, Guo et al., arXiv 2508.07307), written as plain loops, independently of clbench's code;
- the finished runs are recognised as complete: ``run --resume`` and ``sweep`` over them write nothing;
- the run stopped by SIGINT after its first task resumes to completion with ``--resume``, and its results equal those
  of a fresh uninterrupted run of the same command, byte for byte.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import clbench
from clbench.cli.app import main

DATA = Path(__file__).resolve().parents[1] / "data"
RELEASES = sorted(DATA.glob("release-*/commands.json"))
LABELS = {"zeroshot": "Zero-shot", "lora": "LoRA"}  # the report's row labels of the methods stored
TOL = 2e-4  # the CSVs hold 4 decimals; the report prints 4


def _generator():
    spec = importlib.util.spec_from_file_location("make_release_results", DATA / "make_release_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=[p.parent.name for p in RELEASES])
def release(request, tmp_path: Path) -> tuple[Path, dict]:
    """(a copy of one release's results folder, its commands.json), the resume checkpoint rebuilt in place."""
    root = Path(shutil.copytree(DATA / request.param, tmp_path / request.param))
    info = json.loads((root / "commands.json").read_text())
    (folder,) = {p.parent for p in (root / "interrupted").rglob("resume.holes.json")}
    name = json.loads((folder / "resume.holes.json").read_text())["weights"]
    (weights,) = Path(clbench.__file__).parent.rglob(name)  # the shipped tiny CLIP, wherever the package keeps it
    (folder / "resume.safetensors").write_bytes(_generator().rebuild_checkpoint(folder, weights))
    (folder / "resume.stripped").unlink()
    (folder / "resume.holes.json").unlink()
    return root, info


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()  # the commands pass --threads 1
    yield
    torch.set_num_threads(before)


def command(info: dict, part: str, root: Path, out: Path | None = None) -> list[str]:
    """The stored command of ``part`` with its --out under ``root`` (or ``out``)."""
    args = list(info["commands"][part])
    i = args.index("--out") + 1
    args[i] = str(out if out is not None else root / args[i])
    return args


def without(args: list[str], option: str) -> list[str]:
    """``args`` less ``option`` and its value."""
    i = args.index(option)
    return args[:i] + args[i + 2:]


def matrix(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "accuracy.csv", index_col=0)


def report_csv(capsys, *args: str) -> pd.DataFrame:
    capsys.readouterr()
    assert main(["report", *args, "--format", "csv", "--out", "-"]) == 0
    return pd.read_csv(io.StringIO(capsys.readouterr().out))


def mtil_expected(a: np.ndarray) -> dict[str, list[float]]:
    """Per dataset j: Transfer = mean of A[i, j] over the tasks i < j trained before it (none for the first),
    Average = mean of column j, Last = A[T-1, j]; plus each block's mean over its datasets."""
    t = a.shape[0]
    transfer = [float("nan")] + [sum(a[i, j] for i in range(j)) / j for j in range(1, t)]
    average = [sum(a[i, j] for i in range(t)) / t for j in range(t)]
    last = [a[t - 1, j] for j in range(t)]
    return {"Transfer": transfer + [sum(transfer[1:]) / (t - 1)], "Average": average + [sum(average) / t],
            "Last": last + [sum(last) / t]}


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_release_clip_runs_report_their_matrices(release, capsys, tmp_path: Path) -> None:
    root, _ = release
    table = report_csv(capsys, str(root / "clip"))
    runs = sorted((root / "clip").glob("*/*/seed0"))
    assert [r.parent.name for r in runs] == ["lora", "zeroshot"]
    for run in runs:
        a = matrix(run)
        rows = table[table["method"] == LABELS[run.parent.name]]
        for block, values in mtil_expected(a.to_numpy()).items():
            got = rows[rows["block"] == block].set_index("dataset")["mean"]
            assert list(got.index) == [*a.columns, "Mean"], (run, block)
            np.testing.assert_allclose(got.to_numpy(float), values, atol=TOL, equal_nan=True, err_msg=f"{run} {block}")
    # the written tables (LaTeX with the cost table, Markdown), not only the CSV
    out = tmp_path / "reports"
    assert main(["report", str(root / "clip"), "--costs", "--out", str(out)]) == 0
    assert main(["report", str(root / "clip"), "--format", "markdown", "--out", str(out)]) == 0
    tex, md = (out / "synthetic-order1.tex").read_text(), (out / "synthetic-order1.md").read_text()
    assert "LoRA" in tex and "LoRA" in md and (out / "synthetic-order1_costs.tex").stat().st_size > 0
    last = mtil_expected(matrix(root / "clip/synthetic-order1/lora/seed0").to_numpy())["Last"][-1]
    assert f"{last:.1f}" in md  # LoRA's mean Last, as the Markdown table rounds it


def test_release_sweep_reports_its_sensitivity(release, capsys) -> None:
    root, _ = release
    table = report_csv(capsys, str(root / "sweep"), "--sensitivity", "lora.rank").set_index("value")
    assert sorted(table.index) == [2, 4]
    for value in (2, 4):
        a = matrix(root / f"sweep/synthetic-order1/lora,rank={value}/seed0").to_numpy()
        expected = mtil_expected(a)
        for block in ("Transfer", "Average", "Last"):
            assert table.loc[value, f"{block.lower()}_mean"] == pytest.approx(expected[block][-1], abs=TOL)


def test_release_llava_run_reports_its_matrix(release, capsys) -> None:
    root, _ = release
    (run,) = (root / "mcit").glob("*/lora/seed0")
    a, tasks = matrix(run).to_numpy(), list(matrix(run).columns)
    t = len(tasks)
    assert len({float(x) for x in a.ravel()}) > 3  # a matrix that can tell one formula from another
    expected = {"MFT": sum(a[i, i] for i in range(t)) / t,
                "MFN": sum(a[t - 1, i] for i in range(t)) / t,
                "MAA": sum(sum(a[k, i] for i in range(k + 1)) / (k + 1) for k in range(t)) / t,
                "BWT": sum(a[t - 1, i] - a[i, i] for i in range(t - 1)) / (t - 1),
                "Transfer": sum(sum(a[k, i] for k in range(i)) / i for i in range(1, t)) / (t - 1)}
    table = report_csv(capsys, str(root / "mcit"))
    metrics = table[table["kind"] == "metric"].set_index("column")["mean"]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=TOL), name
    final = table[table["kind"] == "final score"].set_index("column")["mean"]
    np.testing.assert_allclose(final[tasks].to_numpy(float), a[-1], atol=TOL)


@pytest.mark.parametrize("part", ["clip", "mcit", "sweep"])
def test_release_finished_runs_are_recognised_as_complete(release, capsys, part: str) -> None:
    if part == "mcit":
        pytest.importorskip("transformers", reason="the LLaVA setting needs transformers (pip install 'clbench[mcit]')")
    root, info = release
    before = snapshot(root)
    args = command(info, part, root)
    if part != "sweep":
        assert main([*args, "--resume"]) == 0
        err = capsys.readouterr().err
        assert err.count("already complete") == len(args[args.index("--methods") + 1].split(",")), err
        # a sweep of the same settings skips the runs that `run` made (sweep has no --threads)
        args = ["sweep", *without(args[1:], "--threads"), "--launcher", "inline"]
    assert main(args) == 0, args
    capsys.readouterr()
    assert snapshot(root) == before  # nothing rewritten, nothing added


@pytest.mark.slow  # the resumed 2 tasks and a fresh 3-task run of smoke LoRA: ~20 s on a loaded 2-core machine
def test_release_interrupted_run_resumes_like_an_uninterrupted_run(release, capsys, tmp_path: Path) -> None:
    root, info = release
    (folder,) = {p.parent for p in (root / "interrupted").rglob("resume.safetensors")}
    stored = json.loads((folder / "manifest.json").read_text())
    assert stored["status"] == "interrupted" and stored["completed_tasks"] == info["stop_after"]
    first_rows = (folder / "accuracy.csv").read_text().splitlines()
    assert len(first_rows) == 1 + info["stop_after"]

    assert main([*command(info, "interrupted", root), "--resume"]) == 0
    assert f"after task {info['stop_after']} of" in capsys.readouterr().err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["completed_tasks"] == len(stored["datasets"])
    assert [r["after_task"] for r in manifest["resumed"]] == [info["stop_after"]]
    assert not (folder / "resume.safetensors").exists()
    resumed_rows = (folder / "accuracy.csv").read_text().splitlines()
    assert resumed_rows[:len(first_rows)] == first_rows  # the release's rows are kept as they were
    assert len(resumed_rows) == 1 + len(stored["datasets"])

    fresh_out = tmp_path / "fresh"
    assert main(command(info, "interrupted", root, out=fresh_out)) == 0
    (fresh,) = {p.parent for p in fresh_out.rglob("manifest.json")}
    assert fresh.relative_to(fresh_out) == folder.relative_to(root / "interrupted")
    # the files keep the release's layout: the same config.json, the manifest and metrics keys of a finished run
    assert (fresh / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    finished = root / "clip" / folder.relative_to(root / "interrupted")
    for name in ("manifest.json", "metrics.json"):
        new, old = (json.loads((d / name).read_text()) for d in (fresh, finished))
        assert sorted(new) == sorted(old), name
        assert sorted(new.get("per_dataset", {})) == sorted(old.get("per_dataset", {})), name
    # Bit-identical training needs the arithmetic of the release's machine (same torch, BLAS, platform, threads);
    # elsewhere the first task itself may round differently, and only the checks above can hold.
    keys = ("torch", "blas", "lapack", "platform", "python", "threads")
    here = {k: json.loads((fresh / "manifest.json").read_text())["environment"].get(k) for k in keys}
    there = {k: stored["environment"].get(k) for k in keys}
    if here != there:
        pytest.skip(f"not the release's machine ({here} here, {there} there): byte identity not expected")
    for name in ("accuracy.csv", "zeroshot.csv", "metrics.json"):
        assert (folder / name).read_bytes() == (fresh / name).read_bytes(), name
