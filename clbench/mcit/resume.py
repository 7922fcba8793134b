"""Resume of MCIT runs, on the CLIP machinery: the checkpoint format and its checks (:mod:`clbench.storage.checkpoint`),
one lock per run folder (:mod:`clbench.storage.lock`), and the manifest's status and run id.

After every task the run folder gets ``resume.safetensors``: the model's full state dict (LLaVA checkpoints per
task, as MCITlib merges into a full model after each task), the method's state (its generator; KeepLoRA's bases),
torch's, Python's and NumPy's generator states, and as JSON the base row, the matrix rows so far, caption details,
losses, the loop generator's state and the profiler's records. ``clbench run --resume`` continues after the last
completed task and gives the same numbers as an uninterrupted run on the same machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clbench.costs.profiler import Profiler, SectionRecord
from clbench.errors import UserError
from clbench.storage.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    capture_rng,
    check_info,
    check_rng_tensors,
    load_checkpoint,
    read_info,
    restore_rng,
)
from clbench.storage.lock import LOCK_NAME

SCORE_BOUND = 1000.0  # a caption average includes CIDEr x 100 (at most 1000); every other score is a percent


@dataclass
class McitPlan:
    """How one method's run starts: ``fresh``, ``resume`` after ``completed`` tasks, or ``done`` already."""

    name: str
    path: Path
    run_id: str
    tasks: list[str]
    mode: str = "fresh"
    completed: int = 0
    config: dict = field(default_factory=dict)  # the resolved configuration the run id is made of (config.json)


def _manifest(path: Path) -> dict:
    from clbench.storage.safeio import json_object, read_json

    file = path / "manifest.json"
    if not file.exists():
        return {}
    fix = "delete that run folder, or drop --resume"
    return json_object(read_json(file, "run file", fix), file, "run file", fix)


def has_run(path: Path) -> bool:
    """A run was started here: a manifest, a checkpoint, or a (possibly stale) lock."""
    return any((path / name).exists() for name in ("manifest.json", CHECKPOINT_NAME, LOCK_NAME))


def plan_run(plan: McitPlan, resume: bool | str, notify: Callable[[str], None]) -> McitPlan:
    """Decide how ``plan``'s run starts, checking a checkpoint's header against this configuration.

    ``resume="auto"`` (sweeps): a complete run of this configuration is done, an unfinished one resumes, and a
    run of another configuration in the folder is replaced (``True`` refuses that one instead)."""
    path, ckpt = plan.path, plan.path / CHECKPOINT_NAME
    if not resume:
        if ckpt.exists():
            notify(f"{plan.name}: starting over in {path}; its unfinished run is discarded (pass --resume to "
                   "continue it)")
        return plan
    if not has_run(path):
        notify(f"{plan.name}: no run to resume in {path}; starting it")
        return plan
    manifest = _manifest(path)
    if manifest.get("status") == "complete" and manifest.get("run_id") == plan.run_id \
            and all((path / f).exists() for f in ("accuracy.csv", "metrics.json")):
        notify(f"{plan.name}: already complete in {path}; nothing to resume")
        plan.mode, plan.completed = "done", len(plan.tasks)
        return plan
    info = read_info(ckpt) if ckpt.exists() else None
    found = info.get("run_id") if info else manifest.get("run_id")
    if found is not None and found != plan.run_id and resume == "auto":
        notify(f"{plan.name}: {path} holds a run of other settings; replacing it")
        return plan
    if found is not None and found != plan.run_id:
        raise UserError(f"--resume: the run in {path} was made with other options (run id {found}, now "
                        f"{plan.run_id}); rerun with the same options, or drop --resume to start over")
    if info is None:
        notify(f"{plan.name}: {path} has no completed task to resume from; starting it from the first task")
        return plan
    plan.completed = check_info(ckpt, info, plan.run_id, plan.tasks, union=False, upper=SCORE_BOUND)
    plan.mode = "resume"
    notify(f"{plan.name}: resuming {path} after task {plan.completed} of {len(plan.tasks)}")
    return plan


def capture(run_id: str, state: dict, tasks: list[str], model, method, profiler: Profiler) -> Checkpoint:
    """The run's state after ``len(state["matrix"])`` tasks (``state`` as the loop's ``on_task_end`` gives it)."""
    rng, rng_extra = capture_rng()
    extra = {"details": state["details"], "losses": state["losses"], "generator": state["generator"]}
    return Checkpoint(run_id=run_id, completed=len(state["matrix"]), datasets=list(tasks),
                      zeroshot=list(state["base"]), rows=[list(r) for r in state["matrix"]],
                      model={k: v.detach() for k, v in model.state_dict().items()}, method=method.state_dict(),
                      method_extra=extra, profile=[dataclasses.asdict(r) for r in profiler.records],
                      state_bytes=[dict(r) for r in profiler.state_bytes], rng=rng, rng_extra=rng_extra)


def restore(plan: McitPlan, model, method, profiler: Profiler) -> dict:
    """Load ``plan``'s checkpoint into ``model``, ``method`` and ``profiler``; returns the loop's start state.
    A checkpoint that does not fit (edited, another method's, another model's) is one line."""
    path = plan.path / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    if ckpt.run_id != plan.run_id or ckpt.completed != plan.completed:
        raise UserError(f"{path} changed while this run was starting; rerun with --resume")
    check_info(path, ckpt.info(), plan.run_id, plan.tasks, union=False, upper=SCORE_BOUND)
    check_rng_tensors(path, ckpt.rng)

    def refuse(why: str) -> UserError:
        return UserError(f"cannot resume from {path}: {why}; delete it and rerun without --resume to start over")

    extra = ckpt.method_extra
    generator = extra.get("generator")
    if not (isinstance(extra.get("details"), list) and len(extra["details"]) == ckpt.completed
            and isinstance(extra.get("losses"), list) and len(extra["losses"]) == ckpt.completed
            and isinstance(generator, list) and len(generator) == torch.Generator().get_state().numel()):
        raise refuse("its caption details, losses or loop generator state are garbled")
    expected = model.state_dict()
    if set(expected) != set(ckpt.model) or any(ckpt.model[k].shape != v.shape for k, v in expected.items()):
        raise refuse("its model does not fit the model built now (another backbone?)")
    try:
        method.load_state_dict(ckpt.method)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise refuse(f"its {plan.name} state does not fit ({' '.join(str(exc).split())[:160]})") from None
    model.load_state_dict(ckpt.model, strict=True)
    known = {f.name for f in dataclasses.fields(SectionRecord)}
    try:
        profiler.records = [SectionRecord(**{k: v for k, v in r.items() if k in known}) for r in ckpt.profile]
    except TypeError as exc:
        raise refuse(f"its profile records are garbled ({exc})") from None
    profiler.state_bytes = [dict(r) for r in ckpt.state_bytes]
    restore_rng(ckpt.rng, ckpt.rng_extra)
    return {"base": ckpt.zeroshot, "matrix": ckpt.rows, "details": extra["details"], "losses": extra["losses"],
            "generator": generator}
