"""Hostile input, second round: special files, non-finite and oversized values, untrusted report inputs, report
writes that fail half-way, OS errors. Each case must end in one line with exit status 2 (or a correct result),
with nothing half-written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from clbench.cli.app import main
from clbench.errors import UserError
from clbench.storage.safeio import read_bytes, read_json

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet"]
sys.path.insert(0, str(Path(__file__).parents[1]))
from fake_runs import write_fake_run  # noqa: E402
from test_bad_input import assert_one_line_error, snapshot  # noqa: E402


def matrix_csv(path: Path, rows: list[list[str]], header: str = "trained_on,a,b") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


# ---- special files: regular files only, with a size cap ------------------------------------------------
@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.csv"
    os.mkfifo(path)  # nobody writes to it: a plain open() would block forever
    return path


def test_metrics_of_dev_zero_and_of_a_symlink_to_it(tmp_path: Path, capsys) -> None:
    assert_one_line_error(capsys, main(["metrics", "/dev/zero"]), "/dev/zero", "not a regular file")
    link = tmp_path / "accuracy.csv"
    link.symlink_to("/dev/zero")
    assert_one_line_error(capsys, main(["metrics", str(link)]), str(link), "a device")


def test_metrics_of_a_fifo_does_not_hang(fifo: Path, capsys) -> None:
    assert_one_line_error(capsys, main(["metrics", str(fifo)]), str(fifo), "FIFO")


def test_size_cap_is_said(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text("[" + "0," * 600 + "0]")
    with pytest.raises(UserError, match="over the 0 MiB"):
        read_bytes(path, "test file", "fix it", limit=1000)
    assert len(read_bytes(path, "test file", "fix it", limit=10_000)) == path.stat().st_size


def test_deeply_nested_json_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="nested too deeply"):
        read_json(deep, "run file", "fix")
    medium = tmp_path / "medium.json"
    medium.write_text("[" * 200 + "]" * 200)  # parses, but deeper than any file clbench writes
    with pytest.raises(UserError, match="over 64 levels"):
        read_json(medium, "run file", "fix")
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"a": {"b": [1, {"c": 2}]}}))
    assert read_json(ok, "run file", "fix") == {"a": {"b": [1, {"c": 2}]}}


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "deep"])
def test_config_file_that_is_special_or_deep(tmp_path: Path, capsys, monkeypatch, target: str) -> None:
    if target == "fifo":
        target = str(tmp_path / "config.toml")
        os.mkfifo(target)
    elif target == "deep":
        target = str(tmp_path / "config.toml")
        Path(target).write_text("data_root = " + "[" * 5000 + "]" * 5000 + "\n")
    monkeypatch.setenv("CLBENCH_CONFIG", target)
    code = main(["run", "--methods", "lora", "--benchmark", "mtil", "--out", str(tmp_path / "out"), *SMOKE])
    assert_one_line_error(capsys, code, "clbench config", target)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("target", "kind"), [("/dev/zero", "a device"), ("link", "a device"),
                                              ("fifo", "a FIFO"), ("folder", "a folder"),
                                              ("missing", "does not exist")])
def test_pretrained_that_is_not_a_regular_file_says_what_it_is(tmp_path: Path, capsys, target: str,
                                                                kind: str) -> None:
    path = {"/dev/zero": Path("/dev/zero"), "link": tmp_path / "w.safetensors", "fifo": tmp_path / "w.safetensors",
            "folder": tmp_path / "weights", "missing": tmp_path / "w.pt"}[target]
    if target == "link":
        path.symlink_to("/dev/zero")
    elif target == "fifo":
        os.mkfifo(path)  # nobody writes to it: opening it to read would block forever
    elif target == "folder":
        path.mkdir()
    code = main(["run", "--methods", "zeroshot", "--out", str(tmp_path / "out"), *SMOKE[:2], "--quiet",
                 "--pretrained", str(path)])
    line = assert_one_line_error(capsys, code, f"pretrained weight file {path} ", kind)
    assert ("not a regular file" in line) == (target != "missing"), line
    assert not (tmp_path / "out").exists()


# ---- non-finite and oversized values ------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["train.lr=nan", "train.lr=1e309", "train.lr=-inf", "keeplora.eps_f=nan",
                                     "lora.train.lr=inf", "train.batch_size=99999999999999999999999"])
def test_non_finite_or_huge_values_are_refused_up_front(tmp_path: Path, capsys, setting: str) -> None:
    out = tmp_path / "out"
    code = main(["run", "--methods", "lora,keeplora", "--out", str(out), *SMOKE, "--set", setting])
    assert_one_line_error(capsys, code, setting.split("=")[0])
    assert not out.exists()


def test_seed_beyond_32_bits_is_refused_by_run_and_by_sweep_dry_run(tmp_path: Path, capsys) -> None:
    big = str(2**40)
    out = tmp_path / "out"
    assert_one_line_error(capsys, main(["run", "--methods", "lora", "--out", str(out), *SMOKE, "--seed", big]),
                          "seed", "<= 4294967295")
    assert_one_line_error(capsys, main(["run", "--methods", "lora", "--out", str(out), *SMOKE, "--seed",
                                        str(2**64 + 1)]), "--seed: 18446744073709551617 is too large")
    assert not out.exists()
    code = main(["sweep", "--methods", "lora", "--seeds", big, "--out", str(out), "--dry-run", *SMOKE])
    printed = capsys.readouterr()
    assert code == 0 and "Traceback" not in printed.err
    assert "0 to run" in printed.out and "1 invalid" in printed.out and "<= 4294967295" in printed.out


# ---- clbench metrics: bad cells are errors, --json is strict JSON -------------------------------------
@pytest.mark.parametrize(("rows", "header", "needle"), [
    ([["a", "50", "40"], ["b", "", "60"]], "trained_on,a,b", "empty or not a number"),
    ([["a", "50", "nan"], ["b", "55", "60"]], "trained_on,a,b", "empty or not a number"),
    ([["a", "50", "40"], ["b", "inf", "60"]], "trained_on,a,b", "outside 0-100"),
    ([["a", "50", "40"], ["b", "101", "60"]], "trained_on,a,b", "outside 0-100"),
    ([["a", "-1", "40"], ["b", "50", "60"]], "trained_on,a,b", "outside 0-100"),
    ([["a", "50", "40", "1"], ["b", "50", "60", "2"]], "trained_on,a,b,a", "'a' more than once"),
])
def test_metrics_refuses_bad_cells(tmp_path: Path, capsys, rows, header, needle) -> None:
    path = matrix_csv(tmp_path / "m.csv", rows, header)
    assert_one_line_error(capsys, main(["metrics", str(path)]), needle)


def test_metrics_json_is_strict_json_for_one_task(tmp_path: Path, capsys) -> None:
    path = matrix_csv(tmp_path / "one.csv", [["a", "42.5"]], "trained_on,a")
    assert main(["metrics", str(path), "--json"]) == 0
    text = capsys.readouterr().out
    got = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in --json output"))
    assert got["transfer"] is None and got["average"] == 42.5 and got["last"] == 42.5
    assert main(["metrics", str(path)]) == 0
    assert "nan" not in capsys.readouterr().out.lower()


def test_metrics_accepts_the_edges_of_the_range(tmp_path: Path, capsys) -> None:
    path = matrix_csv(tmp_path / "m.csv", [["a", "0", "100"], ["b", "100", "0"]])
    assert main(["metrics", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["average"] == pytest.approx(50.0) and got["transfer"] == pytest.approx(100.0)


# ---- report: untrusted manifests and configs ----------------------------------------------------------
def damaged_run(tmp_path: Path, key: str, value, file: str = "manifest.json") -> Path:
    out = tmp_path / "results"
    folder = write_fake_run(out, "lora", 0)
    data = json.loads((folder / file).read_text())
    data[key] = value
    (folder / file).write_text(json.dumps(data))
    return out


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("seed", "abc", "seed"),
    ("seed", True, "seed"),
    ("order", [1], "order"),
    ("benchmark", "mtil\nx", "benchmark"),
    ("benchmark", "../../escape", "benchmark"),
    ("benchmark", 7, "benchmark"),
    ("method", {"a": 1}, "method"),
    ("evaluation", {"rule": "bogus"}, "evaluation rule"),
])
def test_report_checks_manifest_types(tmp_path: Path, capsys, key: str, value, needle: str) -> None:
    out = damaged_run(tmp_path, key, value)
    report = tmp_path / "report"
    assert_one_line_error(capsys, main(["report", str(out), "--out", str(report)]), needle)
    assert not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_report_of_a_config_that_is_a_list_or_deep(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    folder = write_fake_run(out, "lora", 0)
    (folder / "config.json").write_text("[1, 2]")
    assert_one_line_error(capsys, main(["report", str(out), "--out", str(tmp_path / "r")]), "config.json",
                          "not a JSON object")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(capsys, main(["report", str(out), "--out", str(tmp_path / "r")]), "config.json",
                          "nested too deeply")
    assert not (tmp_path / "r").exists()


def test_report_of_a_metrics_file_linked_to_dev_zero(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    folder = write_fake_run(out, "lora", 0)
    (folder / "metrics.json").unlink()
    (folder / "metrics.json").symlink_to("/dev/zero")
    assert_one_line_error(capsys, main(["report", str(out), "--out", str(tmp_path / "r")]), "metrics.json",
                          "not a regular file")


# ---- report: all or nothing ---------------------------------------------------------------------------
def test_report_write_failing_half_way_leaves_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    import clbench.reports.report as report_mod

    out = tmp_path / "results"
    for seed in (0, 1):
        write_fake_run(out, "lora", seed, with_state=True)
    target = tmp_path / "deep" / "report"
    real, calls = report_mod.atomic_write_bytes, []

    def disk_full_on_third(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(report_mod, "atomic_write_bytes", disk_full_on_third)
    code = main(["report", str(out), "--out", str(target), "--figures", "--costs"])
    assert_one_line_error(capsys, code, "No space left on device", "nothing was written")
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # deep/ made for the report is gone too


def test_report_into_a_read_only_folder(tmp_path: Path, capsys) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    out = tmp_path / "results"
    write_fake_run(out, "lora", 0)
    target = tmp_path / "ro"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    target.chmod(0o555)
    try:
        before = snapshot(target)
        assert_one_line_error(capsys, main(["report", str(out), "--out", str(target)]), "cannot write the report")
        assert snapshot(target) == before
    finally:
        target.chmod(0o755)


def test_report_replaces_an_older_report_whole(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    write_fake_run(out, "lora", 0)
    target = tmp_path / "report"
    assert main(["report", str(out), "--out", str(target), "--format", "csv"]) == 0
    first = capsys.readouterr().out
    assert main(["report", str(out), "--out", str(target), "--format", "csv"]) == 0
    assert capsys.readouterr().out == first
    names = sorted(p.name for p in target.iterdir())
    assert names == [Path(line.split("wrote ", 1)[1]).name for line in first.splitlines()]  # no staging left
    assert pd.read_csv(target / names[0]).shape[0] > 0


# ---- OS errors on path options ------------------------------------------------------------------------
def test_overlong_path_component_in_path_options(tmp_path: Path, capsys) -> None:
    long = tmp_path / ("x" * 300)
    results = tmp_path / "results"
    write_fake_run(results, "lora", 0)
    cases = [
        ["run", "--methods", "lora", "--out", str(long), *SMOKE],
        ["run", "--methods", "lora", "--out", str(tmp_path / "o"), *SMOKE, "--benchmark", "mtil",
         "--data-root", str(long)],
        ["run", "--methods", "lora", "--out", str(tmp_path / "o"), "--preset", "smoke", "--quiet",
         "--pretrained", str(long / "w.safetensors")],
        ["metrics", str(long)],
        ["report", str(results), "--out", str(long)],
        ["report", str(long)],
    ]
    for args in cases:
        assert_one_line_error(capsys, main(args), "too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_symlink_loop_as_out(tmp_path: Path, capsys) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    results = tmp_path / "results"
    write_fake_run(results, "lora", 0)
    assert_one_line_error(capsys, main(["run", "--methods", "lora", "--out", str(loop), *SMOKE]), str(loop))
    assert_one_line_error(capsys, main(["report", str(results), "--out", str(loop)]), str(loop))


@pytest.mark.parametrize(("exc", "needles"), [
    (OSError(28, "No space left on device", "/results/x/accuracy.csv"), ("No space left", "/results/x/accuracy.csv")),
    (RecursionError("maximum recursion depth exceeded"), ("nested too deeply",)),
    (MemoryError(), ("out of memory",)),
])
def test_last_resort_handler_prints_one_line(capsys, monkeypatch, exc, needles) -> None:
    import clbench.cli.app as cli

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(cli, "app", boom)
    assert_one_line_error(capsys, cli.main(["metrics", "x"]), *needles)


# ---- untrusted images in user-given reference data: the same one-line rule as MTIL's --------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_zscl_unreadable_reference_image_is_one_line(tmp_path: Path, capsys, workers: int) -> None:
    from PIL import Image

    images = tmp_path / "ref"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 90, 200)).save(images / cls / f"{i}.png")
    bad = images / "b" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    (tmp_path / "cc.csv").write_text("title\na dog\na red car\n")
    out = tmp_path / "out"
    code = main(["run", "--methods", "zscl", "--out", str(out), *SMOKE, "--set", "data.num_tasks=2",
                 "--set", f"zscl.ref_images={images}", "--set", f"zscl.ref_captions={tmp_path / 'cc.csv'}",
                 "--set", "zscl.ref_batch_size=8", "--set", f"zscl.ref_workers={workers}"])
    captured = capsys.readouterr()
    lines = [x for x in captured.err.strip().splitlines() if x.strip() and not x.startswith("note: ")]
    assert code == 2 and len(lines) == 1, captured.err[-3000:]
    assert "Traceback" not in captured.err and str(bad) in lines[0] and "zscl.ref_images" in lines[0]
    assert not out.exists()


# ---- CIFAR-100's pickles: a restricted unpickler -------------------------------------------------------
def test_restricted_unpickler_reads_arrays_and_refuses_globals(tmp_path: Path) -> None:
    import pickle

    import numpy as np

    from clbench.datasets import safe_pickle

    entry = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "fine_labels": [3, 1], "batch_label": "t",
             b"raw": (1.5, None, True)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps(entry, protocol=protocol))
        got = safe_pickle.load(path)
        assert np.array_equal(got["data"], entry["data"]) and got["data"].dtype == np.uint8
        assert got["fine_labels"] == [3, 1] and got[b"raw"] == (1.5, None, True)
    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({"data": _Plant(tmp_path / "pwned")}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (io|builtins)\.open"):
        safe_pickle.load(evil)
    assert not (tmp_path / "pwned").exists()


class _Plant:
    """Unpickling this runs ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("victim", ["meta", "train", "test"])
def test_planted_cifar100_pickle_runs_no_code(tmp_path: Path, capsys, victim: str) -> None:
    import pickle

    from fake_mtil import fake_cifar100

    root = tmp_path / "data"
    fake_cifar100(root)
    marker = tmp_path / "pwned"
    (root / "cifar-100-python" / victim).write_bytes(pickle.dumps({"fine_label_names": _Plant(marker),
                                                                   "data": _Plant(marker)}))
    from clbench.datasets.mtil import read_source

    with pytest.raises(UserError, match=r"CIFAR100.*refusing to load (io|builtins)\.open"):
        read_source(root, "CIFAR100")
    code = main(["data", "check", "--data-root", str(root)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out and "refusing to load io.open" in captured.out + \
        captured.err
    assert code != 0
    assert not marker.exists(), "the planted pickle ran"


def test_genuine_cifar100_layout_still_reads(tmp_path: Path) -> None:
    from fake_mtil import fake_cifar100

    from clbench.datasets.mtil import read_source

    fake = fake_cifar100(tmp_path / "data")
    source = read_source(tmp_path / "data", "CIFAR100")
    assert source.classnames == fake.classnames
    image, label = source.train[4]
    assert label == 1 and image.getpixel((0, 0)) == (41, 41, 41)  # sample 4: value 10*4 + label 1
    assert len(source.train) == fake.n_train and len(source.test) == fake.n_test


def test_overlong_data_root_in_the_config_file_and_a_fifo_as_report_input(tmp_path: Path, capsys, monkeypatch,
                                                                          fifo: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'data_root = "{tmp_path / ("z" * 300)}"\n')
    monkeypatch.setenv("CLBENCH_CONFIG", str(config))
    code = main(["run", "--methods", "lora", "--benchmark", "mtil", "--out", str(tmp_path / "o"), *SMOKE])
    assert_one_line_error(capsys, code, "data_root in", "too long")
    assert_one_line_error(capsys, main(["data", "check"]), "data_root in", "too long")
    assert_one_line_error(capsys, main(["report", str(fifo), "--out", str(tmp_path / "r")]),
                          "not a regular file or a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "pipe.csv"]


def test_resume_command_for_run_and_sweep() -> None:
    from clbench.cli.app import resume_command

    expected = "clbench run --methods lora --out 'a b' --resume"
    assert resume_command(["run", "--methods", "lora", "--out", "a b"]) == expected
    assert resume_command(["run", "--resume", "--methods", "lora"]) == "clbench run --resume --methods lora"
    assert resume_command(["sweep", "--methods", "lora"]) == "clbench sweep --methods lora"


def test_report_into_a_folder_it_cannot_write_even_as_root(tmp_path: Path, capsys, monkeypatch) -> None:
    """The read-only case simulated where the test runs as root (which ignores folder permissions)."""
    import clbench.reports.report as report_mod

    out = tmp_path / "results"
    write_fake_run(out, "lora", 0)
    target = tmp_path / "new" / "report"

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(report_mod.tempfile, "mkdtemp", read_only)
    assert_one_line_error(capsys, main(["report", str(out), "--out", str(target)]), "Permission denied",
                          "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
