"""``clbench run --resume`` on the MCIT setting: an interrupted run continues after its last completed task and
ends with exactly the numbers of an uninterrupted run; mismatched options, a live lock and a damaged checkpoint
are refused in one line."""

from __future__ import annotations

import json
import os
import signal
import socket

import pandas as pd
import pytest

pytest.importorskip("transformers", reason="the MCIT setting needs transformers (pip install 'clbench[mcit]')")

from clbench.cli.app import main  # noqa: E402
from clbench.engine.interrupt import RunInterrupted  # noqa: E402
from clbench.errors import UserError  # noqa: E402
from clbench.settings.mcit.runner import run_mcit  # noqa: E402
from clbench.storage.checkpoint import CHECKPOINT_NAME, read_info  # noqa: E402

SETS = ["data.n_train=8", "data.n_test=2"]
ARGS = {"preset": "smoke", "sets": SETS, "notify": lambda message: None}


def _stop_after(n: int):
    def on_task(method: str, t: int, name: str, row: list[float]) -> None:
        if t + 1 == n:
            raise RunInterrupted(signal.SIGTERM)

    return on_task


def _folder(out):
    return out / "synthetic-mcit-order1" / "keeplora" / "seed0"


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_numbers(tmp_path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_mcit("synthetic-mcit", ["keeplora"], whole, **ARGS)
    with pytest.raises(RunInterrupted):
        run_mcit("synthetic-mcit", ["keeplora"], cut, on_task=_stop_after(2), **ARGS)
    folder = _folder(cut)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["completed_tasks"] == 2
    assert read_info(folder / CHECKPOINT_NAME)["completed"] == 2 and not (folder / "run.lock").exists()
    with pytest.raises(UserError, match="another configuration .*rank: 8 then, 4 now"):  # another rank: another run
        run_mcit("synthetic-mcit", ["keeplora"], cut, resume=True, **{**ARGS, "sets": [*SETS, "keeplora.rank=4"]})
    seen: list[int] = []
    run_mcit("synthetic-mcit", ["keeplora"], cut, resume=True, on_task=lambda m, t, n, r: seen.append(t), **ARGS)
    assert seen == [2, 3, 4]  # tasks 1 and 2 were not trained again
    a, b = pd.read_csv(_folder(whole) / "accuracy.csv"), pd.read_csv(folder / "accuracy.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    got, want = (json.loads((f / "metrics.json").read_text()) for f in (folder, _folder(whole)))
    assert got["losses"] == want["losses"] and got["mft"] == want["mft"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"][0]["after_task"] == 2
    assert not (folder / CHECKPOINT_NAME).exists()
    from clbench.config import run_id

    assert run_id(json.loads((folder / "config.json").read_text())) == manifest["run_id"]  # the id is the config's
    profile = pd.read_csv(folder / "profile.csv")
    assert sorted(set(profile["task"])) == sorted(set(pd.read_csv(_folder(whole) / "profile.csv")["task"]))
    notes: list[str] = []
    run_mcit("synthetic-mcit", ["keeplora"], cut, resume=True, **{**ARGS, "notify": notes.append})
    assert any("already complete" in n for n in notes)


def test_resume_without_a_run_is_one_line(tmp_path, capsys) -> None:
    rc = main(["run", "--methods", "lora", "--benchmark", "synthetic-mcit", "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no run to resume" in err and len(err.splitlines()) == 1


def test_a_live_lock_is_refused(tmp_path, capsys) -> None:
    folder = _folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    rc = main(["run", "--methods", "keeplora", "--benchmark", "synthetic-mcit", "--out", str(tmp_path),
               "--preset", "smoke", "--resume"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "in use by another clbench run" in errors[0]
    assert sorted(p.name for p in folder.iterdir()) == ["run.lock"]  # nothing written beside the live run


def test_a_foreign_checkpoint_is_refused(tmp_path, capsys) -> None:
    folder = _folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_NAME).write_bytes(b"not a safetensors file")
    rc = main(["run", "--methods", "keeplora", "--benchmark", "synthetic-mcit", "--out", str(tmp_path),
               "--preset", "smoke", "--resume"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "cannot resume from" in errors[0]


@pytest.mark.parametrize(("forge", "needle"), [
    (lambda state, name: state.update({name: state[name][:-1]}), "must be"),  # a basis of too few rows
    (lambda state, name: state.update({name: state[name] * float("nan")}), "must hold finite"),
    (lambda state, name: state.pop(name), "is missing"),
    (lambda state, name: state.update({"basis/nowhere": state[name]}), "names no adapted layer"),
    (lambda state, name: state.update({"generator": state["generator"][:8]}), "generator state"),
])
def test_forged_method_state_is_refused_by_check_state(tmp_path, capsys, forge, needle) -> None:
    """The LLaVA methods' ``check_state`` (the CLIP contract's hook) runs before their state is loaded: a forged
    but well-formed checkpoint (its digest recomputed) is one line naming the entry, and nothing is resumed."""
    from clbench.storage.checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(RunInterrupted):
        run_mcit("synthetic-mcit", ["keeplora"], tmp_path, on_task=_stop_after(1), **ARGS)
    path = _folder(tmp_path) / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    name = sorted(k for k in ckpt.method if k.startswith("basis/"))[0]
    forge(ckpt.method, name)
    save_checkpoint(path, ckpt)
    manifest = (_folder(tmp_path) / "manifest.json").read_text()
    rc = main(["run", "--methods", "keeplora", "--benchmark", "synthetic-mcit", "--out", str(tmp_path), "--preset",
               "smoke", "--resume", *[a for s in SETS for a in ("--set", s)]])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, errors
    assert "keeplora state does not fit this run: method/" in errors[0] and needle in errors[0], errors[0]
    assert (_folder(tmp_path) / "manifest.json").read_text() == manifest  # nothing written
