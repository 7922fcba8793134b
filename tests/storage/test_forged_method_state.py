"""A resume checkpoint re-forged with a fresh digest whose *method* state does not fit the run, for every registered
method (the registry is iterated, so a new method is covered the moment it exists).

Each method runs its first of two smoke tasks and is stopped right after that task's checkpoint. Every kind of
tensor the method stored (bases, memories, histories, heads, exemplars...) is then forged in turn: a row too many,
more columns than rows, a NaN (a negative entry in an integer tensor), an integer dtype, the entry removed; so are
an unexpected tensor, an unexpected JSON
entry, and each JSON entry of the wrong type or length. The file is re-saved with a correct digest
(:func:`~clbench.storage.checkpoint.save_checkpoint`), so only the method's own check can catch it. Each resume must end
in one line naming the checkpoint, the entry and the fix, exit status 2, nothing written, and the folder must
resume once the checkpoint is removed. The control: the same checkpoint re-saved unchanged resumes to complete.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import clbench.engine.runner as runner
from clbench.cli.app import main
from clbench.config import build_config
from clbench.methods import list_methods
from clbench.storage.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from clbench.storage.results import missing_results

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_faults import SMOKE, TWO, assert_one_line_error_ignoring_notes, snapshot, status  # noqa: E402
from test_resume import Interrupt, record_checkpoints, run_folder  # noqa: E402

Forgery = tuple[str, str, Callable[[Checkpoint], None]]  # (description, entry the error must name, edit)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Callable[[str], Path]:
    """``interrupted(method)``: an out folder holding ``method``'s run stopped after its checkpoint of task 1 of 2."""
    made: dict[str, Path] = {}

    def make(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp(method.replace("+", "p"))
            cfg = build_config("smoke", {"pretrained": "none"}, ["data.num_tasks=2"], [method])
            with pytest.MonkeyPatch.context() as mp:
                record_checkpoints(mp, stop_after=1)
                with pytest.raises(Interrupt):
                    runner.run_methods(cfg, [method], out, notify=lambda msg: None)
            made[method] = out
        return made[method]

    return make


def kind_of(key: str) -> str:
    """The kind of a method tensor: the part of its name before the first ``/`` or ``.`` (``basis``, ``head``)."""
    return key.replace(".", "/").split("/")[0]


def tensor_forgeries(ckpt: Checkpoint) -> list[Forgery]:
    """Five forgeries of one tensor of every kind the method stored."""
    victims = {}
    for key in sorted(ckpt.method):
        victims.setdefault(kind_of(key), key)
    out: list[Forgery] = []
    for key in victims.values():
        value = ckpt.method[key]
        entry = f"method/{key}"

        def put(new, key=key):
            return lambda c: c.method.__setitem__(key, new)

        out.append((f"{key}: a row too many", entry, put(torch.zeros(value.shape[0] + 1, *value.shape[1:],
                                                                     dtype=value.dtype))))
        out.append((f"{key}: more columns than rows", entry, put(torch.zeros(value.shape[0], value.shape[0] + 1,
                                                                             dtype=value.dtype))))
        bad = value.clone()  # a NaN in a floating-point tensor, a negative entry in an integer one (labels, ids)
        bad.view(-1)[0] = float("nan") if value.dtype.is_floating_point else -1
        out.append((f"{key}: a {'NaN' if value.dtype.is_floating_point else 'negative entry'}", entry, put(bad)))
        out.append((f"{key}: integer dtype", entry, put(value.to(torch.int32))))
        out.append((f"{key}: missing", entry, lambda c, key=key: c.method.pop(key)))
    return out


def other_forgeries(ckpt: Checkpoint) -> list[Forgery]:
    """An unexpected tensor and JSON entry; every JSON entry of the wrong type, one element short, garbled."""
    out: list[Forgery] = [
        ("an unexpected tensor", "method/bogus/0", lambda c: c.method.__setitem__("bogus/0", torch.zeros(2, 2))),
        ("an unexpected JSON entry", "method_extra.bogus", lambda c: c.method_extra.__setitem__("bogus", 1)),
    ]
    for key, value in ckpt.method_extra.items():
        wrong = [1, 2] if isinstance(value, dict) else {"x": 1}
        out.append((f"{key}: wrong type", f"method_extra.{key}",
                    lambda c, key=key, wrong=wrong: c.method_extra.__setitem__(key, wrong)))
        if isinstance(value, dict) and value:
            first = sorted(value)[0]
            out.append((f"{key}: one element short", f"method_extra.{key}.{first}",
                        lambda c, key=key, first=first: c.method_extra[key].pop(first)))
            if isinstance(value[first], str):
                out.append((f"{key}: a garbled value", f"method_extra.{key}.{first}",
                            lambda c, key=key, first=first: c.method_extra[key].__setitem__(first, "sideways")))
    return out


def resume(out: Path, method: str) -> int:
    return main(["run", "--methods", method, "--out", str(out), *SMOKE, *TWO, "--resume"])


@pytest.mark.parametrize("method", list_methods())
def test_forged_method_state_is_one_line_and_changes_nothing(interrupted, tmp_path: Path, capsys,
                                                             method: str) -> None:
    source = interrupted(method)
    ckpt = load_checkpoint(run_folder(source, method) / CHECKPOINT_NAME)
    forgeries = tensor_forgeries(ckpt) + other_forgeries(ckpt)
    stateful = ("keeplora", "keeplora+", "keeplora++", "inflora", "loda", "icarl", "diki")  # methods that keep state
    if method in stateful:
        assert ckpt.method, f"{method}'s checkpoint should hold method tensors"
    failures = []
    for i, (what, entry, edit) in enumerate(forgeries):
        out = Path(shutil.copytree(source, tmp_path / f"out{i}"))
        folder = run_folder(out, method)
        path = folder / CHECKPOINT_NAME
        forged = load_checkpoint(path)
        edit(forged)
        save_checkpoint(path, forged)  # a fresh, correct digest: only the method's check can refuse it
        before = snapshot(out)
        try:
            try:
                code = resume(out, method)
            except Exception as exc:  # noqa: BLE001 - what the CLI would print as a traceback
                raise AssertionError(f"raised {type(exc).__name__}: {exc}") from None
            line = assert_one_line_error_ignoring_notes(capsys, code)
            assert f"cannot resume from {path}" in line, line
            assert f"{entry} " in line, line
            assert "without --resume" in line, line
            assert status(folder) != "complete"
            assert snapshot(out) == before, "the failed resume changed the run folder"
        except AssertionError as exc:
            failures.append(f"{what}: {' '.join(str(exc).split())[:300]}")
        if i:
            shutil.rmtree(out)
    assert not failures, "\n".join(failures)
    # the first forged folder, its checkpoint removed, runs again from the first task
    folder = run_folder(tmp_path / "out0", method)
    (folder / CHECKPOINT_NAME).unlink()
    assert resume(tmp_path / "out0", method) == 0
    assert "no completed task to resume from" in capsys.readouterr().err
    assert status(folder) == "complete" and missing_results(folder) is None


@pytest.mark.parametrize("method", list_methods())
def test_unforged_method_state_passes_its_check_and_resumes(interrupted, tmp_path: Path, capsys, method: str) -> None:
    """The control: the checkpoint re-saved unchanged resumes (the checks refuse only what does not fit)."""
    out = Path(shutil.copytree(interrupted(method), tmp_path / "out"))
    path = run_folder(out, method) / CHECKPOINT_NAME
    save_checkpoint(path, load_checkpoint(path))
    assert resume(out, method) == 0
    assert "resuming" in capsys.readouterr().err
    folder = run_folder(out, method)
    assert status(folder) == "complete" and missing_results(folder) is None


# ---- the rules at their boundaries (no run: a method on the tiny model) -------------------------------------
def _method(name: str, model):
    from clbench.costs.profiler import Profiler
    from clbench.methods import get_method

    cls = get_method(name)
    method = cls(model, cls.Hparams(), Profiler())
    method.setup()
    return method


def _task(name: str, classes: int):
    from clbench.datasets.base import Task

    return Task(name, [f"c{i}" for i in range(classes)], ["a {}."], [], [])


def test_a_basis_may_have_any_width_up_to_its_layer(tiny_model) -> None:
    from clbench.methods.state_checks import StateMismatch

    method = _method("keeplora", tiny_model)
    state = method.state_dict()
    key = next(iter(state))
    width = state[key].shape[0]
    for columns in (0, 1, width):  # an empty basis, one direction, the whole input space
        method.check_state({**state, key: torch.eye(width)[:, :columns]}, {}, [])
    with pytest.raises(StateMismatch, match="at most"):
        method.check_state({**state, key: torch.zeros(width, width + 1)}, {}, [])


def test_heads_must_be_those_of_the_tasks_done(tiny_model) -> None:
    from clbench.methods.state_checks import StateMismatch

    method = _method("keeplora+", tiny_model)
    bases, width = method.state_dict(), tiny_model.clip.visual.output_dim
    done = [_task("A", 3), _task("B", 5)]
    heads = {"head/A": torch.randn(3, width), "head/B": torch.randn(5, width)}
    method.check_state({**bases, **heads}, {}, done)
    with pytest.raises(StateMismatch, match="head/B is missing"):
        method.check_state({**bases, "head/A": heads["head/A"]}, {}, done)
    with pytest.raises(StateMismatch, match="head/B is not part"):  # a head of a task not done yet
        method.check_state({**bases, **heads}, {}, done[:1])
    with pytest.raises(StateMismatch, match="5 classes"):
        method.check_state({**bases, **heads, "head/B": torch.randn(4, width)}, {}, done)


def test_memories_and_histories_appear_with_the_first_task(tiny_model) -> None:
    from clbench.methods.state_checks import StateMismatch

    for name, key, make in [("inflora", "memory", lambda d: torch.eye(d)[:, :2]),
                            ("loda", "history", lambda d: torch.eye(d, dtype=torch.float64))]:
        method = _method(name, tiny_model)
        extra = method.extra_state()
        method.check_state({}, extra, [])  # before any task: nothing stored
        sites = method.sites()
        state = {f"{key}.{s.name}": make(s.width) for s in sites}
        kinds = {"kinds": {k: "retain" for k in state}} if name == "inflora" else {}
        method.check_state(state, kinds, [_task("A", 3)])
        with pytest.raises(StateMismatch, match="is missing"):
            method.check_state({}, extra, [_task("A", 3)])
    asymmetric = {k: v.clone() for k, v in state.items()}
    next(iter(asymmetric.values()))[0, 1] = 1.0
    with pytest.raises(StateMismatch, match="not symmetric"):
        method.check_state(asymmetric, {}, [_task("A", 3)])


def test_json_state_keeps_its_types() -> None:
    from clbench.methods.state_checks import StateMismatch, expect_like

    fresh = {"count": 3, "rate": 0.5, "names": ["a", "b"], "flag": True}
    expect_like({"count": 4, "rate": 1, "names": ["c", "d"], "flag": False}, fresh, "method_extra")
    for bad, entry in [({**fresh, "count": 2.5}, "count"), ({**fresh, "count": True}, "count"),
                       ({**fresh, "names": ["a"]}, "names"), ({**fresh, "rate": "0.5"}, "rate"),
                       ({**fresh, "flag": 1}, "flag")]:
        with pytest.raises(StateMismatch) as info:
            expect_like(bad, fresh, "method_extra")
        assert info.value.entry == f"method_extra.{entry}", info.value
