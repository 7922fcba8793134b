"""``--threads``: the thread count torch uses is the one asked for, and every manifest records it with the BLAS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clbench.cli.app import main
from clbench.storage.results import thread_info

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet", "--set", "data.num_tasks=2"]


@pytest.fixture()
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_are_set_and_recorded(tmp_path: Path, keep_threads, threads: int) -> None:
    torch.set_num_threads(3 - threads)  # start from the other count, so only --threads can make it match
    assert main(["run", "--methods", "zeroshot", "--out", str(tmp_path), "--threads", str(threads), *SMOKE]) == 0
    (manifest,) = tmp_path.rglob("manifest.json")
    env = json.loads(manifest.read_text())["environment"]
    assert env["threads"] == threads == torch.get_num_threads()
    assert env["interop_threads"] == torch.get_num_interop_threads()
    assert env["blas"] and env["blas"] in torch.__config__.show()


def test_blas_is_read_from_the_build(monkeypatch) -> None:
    monkeypatch.setattr(torch.__config__, "show", lambda: "  - Build settings: BLAS_INFO=open, LAPACK_INFO=open,")
    info = thread_info()
    assert (info["blas"], info["lapack"]) == ("open", "open")


def test_zero_threads_is_refused(tmp_path: Path, capsys) -> None:
    code = main(["run", "--methods", "zeroshot", "--out", str(tmp_path), "--threads", "0", *SMOKE])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--threads" in err, err
