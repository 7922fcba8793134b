"""User mistakes end in one line naming the problem and the fix, exit status 2, no traceback, and no new or
changed file in the output folder (cases beyond tests/engine/test_run.py::test_user_errors_are_one_line_exit_2)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from clbench.cli.app import main

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet"]
TWO_TASKS = ["--set", "data.num_tasks=2"]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder below ``root`` with its mtime and content hash (``{}`` if it does not exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
            for p in sorted(root.rglob("*"))} | {".": (root.stat().st_mtime_ns, "")}


def assert_one_line_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A results folder holding one complete run (zeroshot, 2 tasks, seed 0)."""
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", "--methods", "zeroshot", "--out", str(out), *SMOKE, *TWO_TASKS]) == 0
    return out


@pytest.fixture
def results(finished: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`finished` that a test may damage."""
    return Path(shutil.copytree(finished, tmp_path / "results"))


Case = Callable[[Path], list[str]]


def run(*extra: str) -> Case:
    return lambda out: ["run", "--methods", "lora", "--out", str(out), *SMOKE, *extra]


def a_file(out: Path) -> Path:
    path = out.parent / "a_file"
    path.write_text("not a folder")
    return path


RUN_CASES: dict[str, tuple[Case, tuple[str, ...]]] = {
    "rank above the layer width": (run("--set", "lora.rank=999"), ("lora.rank=999", "width 128", "--set")),
    "keeplora rank just above the width": (
        lambda out: ["run", "--methods", "keeplora", "--out", str(out), *SMOKE, "--set", "keeplora.rank=129"],
        ("keeplora.rank=129", "width 128")),
    "negative rank": (lambda out: ["run", "--methods", "inflora", "--out", str(out), *SMOKE,
                                   "--set", "inflora.rank=-3"], ("inflora.rank=-3", ">= 1")),
    "threshold above 1": (lambda out: ["run", "--methods", "keeplora", "--out", str(out), *SMOKE,
                                       "--set", "keeplora.eps_f=1.5"], ("keeplora.eps_f=1.5", "<= 1")),
    "threshold below 0": (lambda out: ["run", "--methods", "inflora", "--out", str(out), *SMOKE,
                                       "--set", "inflora.lamb=-0.1"], ("inflora.lamb=-0.1", ">= 0")),
    "list of the wrong type": (run("--set", "train.epochs=two"), ("train.epochs", "not a valid int")),
    "int given a fraction": (run("--set", "train.batch_size=1.5"), ("train.batch_size", "not a valid int")),
    "value not among the choices": (run("--set", "data.prompt=all"), ("data.prompt='all'", "ensemble")),
    "assignment without =": (run("--set", "train.lr"), ("expected key=value",)),
    "a group set as a value": (run("--set", "data=3"), ("'data' is a group",)),
    "order 0": (run("--order", "0"), ("order=0", "1, 2")),
    "unknown backbone": (run("--backbone", "nosuch-vit"), ("unknown backbone 'nosuch-vit'",)),
    "precision not among the choices": (run("--precision", "fp16"), ("precision", "fp32")),
    "amp on the CPU": (run("--precision", "amp", "--device", "cpu"), ("--precision amp needs a CUDA device",
                                                                      "--device cuda")),
    "benchmark not implemented": (run("--benchmark", "xtail"), ("xtail",)),
    "empty --methods": (lambda out: ["run", "--methods", " , ", "--out", str(out), *SMOKE], ("--methods is empty",)),
    "method listed twice": (lambda out: ["run", "--methods", "lora,lora", "--out", str(out), *SMOKE],
                            ("lora more than once",)),
    "missing pretrained weight file": (run("--pretrained", "/nonexistent/weights.safetensors"),
                                       ("does not exist", "weights.safetensors")),
    "mtil without a data root": (run("--benchmark", "mtil"), ("--data-root",)),
    "missing data root": (run("--benchmark", "mtil", "--data-root", "/nonexistent/mtil"),
                          ("/nonexistent/mtil", "does not exist")),
    "data root that is a file": (lambda out: run("--benchmark", "mtil", "--data-root", str(a_file(out)))(out),
                                 ("not a folder",)),
    "data root without the datasets": (lambda out: run("--benchmark", "mtil", "--data-root", str(out.parent))(out),
                                       ("MTIL datasets",)),
    "output folder below a file": (lambda out: ["run", "--methods", "lora", "--out", str(a_file(out) / "sub"),
                                                *SMOKE], ("not writable", "--out")),
    "zscl reference data missing (checked after the model is built)": (
        lambda out: ["run", "--methods", "zscl", "--out", str(out), *SMOKE, "--set",
                     "zscl.ref_images=/nonexistent/imagenet", "--set", "zscl.ref_captions=/nonexistent/cc.csv"],
        ("zscl.ref_images=/nonexistent/imagenet",)),
    "resume with nothing to resume": (run("--resume"), ("--resume: no run to resume", "drop --resume")),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_mistakes_are_one_line_and_write_nothing(tmp_path: Path, capsys, monkeypatch, case: str) -> None:
    monkeypatch.delenv("CLBENCH_DATA_ROOT", raising=False)
    build, needles = RUN_CASES[case]
    out = tmp_path / "out"
    args = build(out)
    before = snapshot(tmp_path)
    code = main(args)
    assert_one_line_error(capsys, code, *needles)
    assert snapshot(tmp_path) == before


def test_unknown_device_when_there_is_no_cuda(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code = main(["run", "--methods", "lora", "--out", str(tmp_path / "out"), *SMOKE, "--device", "cuda:0"])
    assert_one_line_error(capsys, code, "no CUDA device", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_resume_with_another_config_names_the_difference(results: Path, capsys) -> None:
    before = snapshot(results)
    code = main(["run", "--methods", "zeroshot", "--out", str(results), *SMOKE, *TWO_TASKS, "--resume",
                 "--set", "train.lr=0.5"])
    assert_one_line_error(capsys, code, "another configuration", "train.lr", "0.5", "drop --resume")
    assert snapshot(results) == before


def test_resume_with_a_corrupt_manifest(results: Path, capsys) -> None:
    manifest = next(results.rglob("manifest.json"))
    manifest.write_text("{not json")
    before = snapshot(results)
    code = main(["run", "--methods", "zeroshot", "--out", str(results), *SMOKE, *TWO_TASKS, "--resume"])
    assert_one_line_error(capsys, code, "manifest.json", "unreadable")
    assert snapshot(results) == before


def test_report_of_a_corrupt_metrics_json(results: Path, tmp_path: Path, capsys) -> None:
    next(results.rglob("metrics.json")).write_text('{"transfer": ')
    out = tmp_path / "report"
    code = main(["report", str(results), "--out", str(out)])
    assert_one_line_error(capsys, code, "metrics.json", "corrupt")
    assert not out.exists()


def test_report_of_an_empty_results_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "report")])
    assert_one_line_error(capsys, code, "no runs in", "clbench run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_missing_launcher_extra(tmp_path: Path, capsys, monkeypatch) -> None:
    from clbench.cli.app import app

    if "sweep" not in {c.name or c.callback.__name__ for c in app.registered_commands}:
        pytest.skip("no 'clbench sweep' command in this version")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    out = tmp_path / "sweep"
    code = main(["sweep", "--methods", "lora", "--out", str(out), "--launcher", "ray", *SMOKE])
    assert_one_line_error(capsys, code, "ray", "pip install")
    assert not out.exists()


@pytest.fixture(scope="module")
def fake_mtil_tree(tmp_path_factory) -> Path:
    from fake_mtil import build_fake_mtil

    return build_fake_mtil(tmp_path_factory.mktemp("mtil") / "data").root


def test_missing_dataset_is_named(fake_mtil_tree: Path, tmp_path: Path, capsys) -> None:
    root = Path(shutil.copytree(fake_mtil_tree, tmp_path / "data"))
    shutil.rmtree(root / "dtd")
    out = tmp_path / "out"
    code = main(["run", "--methods", "lora", "--benchmark", "mtil", "--data-root", str(root), "--out", str(out),
                 *SMOKE, "--device", "cpu"])
    assert_one_line_error(capsys, code, "DTD", "dtd")
    assert not out.exists()


def test_unreadable_image_in_the_first_task_leaves_no_files(fake_mtil_tree: Path, tmp_path: Path, capsys) -> None:
    """Images are decoded lazily, so this one surfaces during training; the run folder is still untouched."""
    root = Path(shutil.copytree(fake_mtil_tree, tmp_path / "data"))
    bad = sorted((root / "fgvc-aircraft-2013b" / "data" / "images").iterdir())[0]
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(["run", "--methods", "lora", "--benchmark", "mtil", "--data-root", str(root), "--out", str(out),
                 *SMOKE, "--device", "cpu", "--set", "data.num_tasks=1", "--allow-incomplete"])
    assert_one_line_error(capsys, code, bad.name, "--skip-bad-images")
    assert not out.exists()
