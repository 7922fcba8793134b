"""Resume of MCIT runs: what this setting's checkpoint holds; the rest is the bookkeeping every runner shares
(:mod:`clbench.engine.rundir`: the start decision, the checkpoint's framing and checks, the model and profiler
restore) on the CLIP checkpoint format (:mod:`clbench.storage.checkpoint`).

After every task the run folder gets ``resume.safetensors``: the model's full state dict (LLaVA checkpoints per
task, as MCITlib merges into a full model after each task), the method's state (its generator; KeepLoRA's bases),
torch's, Python's and NumPy's generator states, and as JSON the base row, the matrix rows so far, caption details,
losses, the loop generator's state and the profiler's records. ``clbench run --resume`` continues after the last
completed task and gives the same numbers as an uninterrupted run on the same machine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clbench.costs.profiler import Profiler
from clbench.engine.rundir import (
    RunPlan,
    bad_checkpoint,
    decide_start,
    make_checkpoint,
    restore_model,
    restore_profiler_and_rng,
)
from clbench.methods.state_checks import StateMismatch
from clbench.settings.mcit import LAYOUT
from clbench.storage.checkpoint import CHECKPOINT_NAME, Checkpoint
from clbench.storage.results import missing_results

SCORE_BOUND = 1000.0  # a caption average includes CIDEr x 100 (at most 1000); every other score is a percent


def plan_run(plan: RunPlan, resume: bool | str, notify: Callable[[str], None]) -> RunPlan:
    """Decide how ``plan``'s run starts (:func:`clbench.engine.rundir.decide_start`, the CLIP runs' rule), with
    this setting's complete files and score bound. ``resume="auto"`` (sweeps): a complete run of this
    configuration is done, an unfinished one resumes, and a run of another configuration in the folder is
    replaced (``True`` refuses that one instead)."""
    return decide_start(plan, resume, notify, lambda folder: missing_results(folder, plan.tasks, layout=LAYOUT),
                        upper=SCORE_BOUND)


def capture(run_id: str, state: dict, tasks: list[str], model, method, profiler: Profiler) -> Checkpoint:
    """The run's state after ``len(state["matrix"])`` tasks (``state`` as the loop's ``on_task_end`` gives it)."""
    extra = {"details": state["details"], "losses": state["losses"], "generator": state["generator"]}
    return make_checkpoint(run_id, tasks, state["base"], state["matrix"], model, method.state_dict(), extra,
                           profiler)


def restore(plan: RunPlan, ckpt: Checkpoint, model, method, profiler: Profiler) -> dict:
    """Load ``plan``'s checkpoint ``ckpt`` (loaded and checked against the plan by the engine) into ``model``,
    ``method`` and ``profiler``; returns the loop's start state. A checkpoint that does not fit (edited, another
    method's, another model's) is one line."""
    path = plan.path / CHECKPOINT_NAME
    extra = ckpt.method_extra
    generator = extra.get("generator")
    if not (isinstance(extra.get("details"), list) and len(extra["details"]) == ckpt.completed
            and isinstance(extra.get("losses"), list) and len(extra["losses"]) == ckpt.completed
            and isinstance(generator, list) and len(generator) == torch.Generator().get_state().numel()):
        raise bad_checkpoint(path, "its caption details, losses or loop generator state are garbled")
    try:
        method.check_state(ckpt.method, extra, plan.tasks[: ckpt.completed])
    except StateMismatch as exc:
        raise bad_checkpoint(path, f"its {plan.name} state does not fit this run: {exc.entry} {exc.why}") from None
    try:
        method.load_state_dict(ckpt.method)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise bad_checkpoint(path, f"its {plan.name} state does not fit ({' '.join(str(exc).split())[:160]})") from None
    restore_model(model, ckpt.model, path)
    restore_profiler_and_rng(ckpt, profiler, path)
    return {"base": ckpt.zeroshot, "matrix": ckpt.rows, "details": extra["details"], "losses": extra["losses"],
            "generator": generator}
