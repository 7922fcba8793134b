"""The LLaVA (MCIT) setting's steps of the one task loop (:func:`clbench.engine.loop.run_tasks`): for each task,
``before_task`` -> train -> ``after_task`` -> score every task.

Every task is evaluated after every task (the full T x T matrix, upper triangle included, as KeepLoRA's
``Eval_finetune1a.sh``), with greedy decoding. Training follows MCITlib's recipe: AdamW, weight decay 0, cosine
schedule with 3 % warm-up, per-task epochs; only what the method's ``trainable_parameters`` return is trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from clbench.costs.profiler import Profiler
from clbench.engine.loop import Hooks, TaskSteps, run_tasks
from clbench.engine.schedules import warmup_cosine_lr
from clbench.settings.mcit import scorers
from clbench.settings.mcit.caption import caption_average, caption_scores
from clbench.settings.mcit.codec import Codec, generate
from clbench.settings.mcit.methods import McitContext, McitMethod
from clbench.settings.mcit.synthetic import Split


@dataclass
class McitTask:
    """One task: name, scorer name (exact, caption, ai2d, pvqa, sci, finvis) and its splits."""

    name: str
    scorer: str
    train: Split
    test: Split
    image_root: Path | None = None


@dataclass
class LoopConfig:
    """Training and evaluation settings shared by every method."""

    # ranges in the metadata, checked by every --set (clbench.config.set_field), as for the CLIP settings
    epochs: list[int] = field(default_factory=lambda: [1], metadata={"min": 1})  # per task; the last value repeats
    batch_size: int = field(default=16, metadata={"min": 1})
    warmup: float = field(default=0.03, metadata={"min": 0.0, "max": 1.0})  # share of the steps
    max_new_tokens: int = field(default=10, metadata={"min": 1})
    eval_batch: int = field(default=64, metadata={"min": 1})
    # KeepLoRA; None ("none") = MCITlib LoRA-FT (no truncation)
    caption_max_chars: int | None = field(default=300, metadata={"min": 1, "nullable": True})

    def epochs_for(self, t: int) -> int:
        return self.epochs[min(t, len(self.epochs) - 1)]


def _images(split: Split, idx: list[int], root: Path | None):
    if isinstance(split.images, Tensor):
        return split.images[idx]
    from PIL import Image

    out = []
    for i in idx:
        path = (root or Path(".")) / split.images[i]
        try:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        except OSError as exc:
            from clbench.errors import UserError

            raise UserError(f"cannot read image {path} ({exc.__class__.__name__}); check the dataset's images "
                            "folder") from None
    return out


def _batches(codec: Codec, task: McitTask, order: list[int], batch_size: int, device) -> Iterator[dict[str, Tensor]]:
    s = task.train
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = codec.train_batch([s.questions[i] for i in idx], [s.answers[i] for i in idx],
                                  _images(s, idx, task.image_root))
        yield {k: v.to(device) for k, v in batch.items()}


def evenly_spaced_share(total: int, fraction: float) -> list[int]:
    """KeepLoRA's LLaVA share of the training items (``extract_gradients.py``): ``int(N·f)`` items at
    ``linspace(0, N − 1, int(N·f))`` truncated to integers, so the first and the last item are both in it. At
    least one item (the official code would take none when ``N·f < 1`` and divide by zero)."""
    keep = max(1, int(total * fraction))
    return torch.linspace(0, total - 1, keep).long().tolist()


def _context(t: int, task: McitTask, n: int, codec: Codec, device, gen: torch.Generator) -> McitContext:
    def batches(fraction: float = 1.0, batch_size: int = 1, evenly_spaced: bool = True):
        total = len(task.train)
        order = (evenly_spaced_share(total, fraction) if evenly_spaced
                 else torch.randperm(total, generator=gen)[:max(1, int(total * fraction))].tolist())
        return _batches(codec, task, order, batch_size, device)

    return McitContext(t, task.name, n, torch.device(device), batches)


def lr_factor(steps: int, warmup: float) -> Callable[[int], float]:
    """The rate's factor before optimiser step ``s`` of ``steps``: linear warm-up over ``W = max(1, ⌈warmup·steps⌉)``
    steps, then cosine to 0 — the shared loop's warm-up cosine (:func:`clbench.engine.schedules.warmup_cosine_lr`,
    ZSCL's rule), the same numbers at every step the loop takes."""
    warm = max(1, math.ceil(warmup * steps))
    return lambda step: warmup_cosine_lr(1.0, step, warm, steps)


def train_task(model, codec: Codec, task: McitTask, method: McitMethod, cfg: LoopConfig, epochs: int, device,
               gen: torch.Generator) -> float:
    """Train on one task; returns the mean loss of the last epoch."""
    groups = [g for g in method.trainable_parameters() if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = epochs * math.ceil(len(task.train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(steps, cfg.warmup))
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        order = torch.randperm(len(task.train), generator=gen).tolist()
        for batch in _batches(codec, task, order, cfg.batch_size, device):
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    model.eval()
    return sum(losses) / max(len(losses), 1)


def predict(model, codec: Codec, task: McitTask, cfg: LoopConfig) -> list[str]:
    """Greedy answers to every test question of ``task``."""
    s = task.test
    out: list[str] = []
    model.eval()
    for start in range(0, len(s), cfg.eval_batch):
        idx = list(range(start, min(start + cfg.eval_batch, len(s))))
        out += generate(model, codec, [s.questions[i] for i in idx], _images(s, idx, task.image_root),
                        cfg.max_new_tokens)
    return out


def score(task: McitTask, predictions: list[str], cfg: LoopConfig) -> tuple[float, dict]:
    """The task's official score (percent) of ``predictions`` and, for captions, the metrics behind it."""
    s = task.test
    if task.scorer == "caption":
        ids = s.ids or [str(i) for i in range(len(s))]
        metrics = caption_scores(dict(zip(ids, predictions, strict=True)), dict(zip(ids, s.references, strict=True)),
                                 max_chars=cfg.caption_max_chars)
        value, used = caption_average(metrics)
        return value, {**metrics, "averaged": used}
    item = {"exact": scorers.exact_match_item, "ai2d": scorers.ai2d_item, "pvqa": scorers.pvqa_item,
            "finvis": scorers.finvis_item}.get(task.scorer)
    if task.scorer == "sci":
        names = s.image_names or [""] * len(s)
        values = [scorers.sci_item(p, a, q, n) for p, a, q, n in zip(predictions, s.answers, s.questions, names,
                                                                       strict=True)]
    elif item is None:
        raise ValueError(f"unknown scorer {task.scorer!r}")
    else:
        values = [item(p, a) for p, a in zip(predictions, s.answers, strict=True)]
    return scorers.accuracy(values), {}


def evaluate_all(model, codec: Codec, tasks: list[McitTask], cfg: LoopConfig) -> tuple[list[float], list[dict]]:
    """Scores of every task (one matrix row) and their caption details."""
    row, details = [], []
    for task in tasks:
        value, extra = score(task, predict(model, codec, task, cfg), cfg)
        row.append(value)
        details.append(extra)
    return row, details


class McitSteps(TaskSteps):
    """The LLaVA setting's steps of the task loop (:func:`clbench.engine.loop.run_tasks`): the base model's scores,
    the loop generator (one, seeded by the run's seed, carried through the checkpoint), MCITlib's training recipe,
    and one row of official scores per task. ``state`` is what the run keeps: ``base``, ``matrix``, ``details``,
    ``losses``."""

    def __init__(self, model, codec: Codec, tasks: list[McitTask], method: McitMethod, cfg: LoopConfig,
                 profiler: Profiler, device, seed: int, start: dict | None, hooks: Hooks | None) -> None:
        super().__init__(method, profiler, hooks, [t.name for t in tasks])
        self.model, self.codec, self.tasks, self.cfg, self.device = model, codec, tasks, cfg, device
        self.gen = torch.Generator().manual_seed(seed)
        if start is None:
            self.state: dict = {"base": [], "matrix": [], "details": [], "losses": []}
        else:
            self.gen.set_state(torch.tensor(start["generator"], dtype=torch.uint8))
            self.state = {k: list(start[k]) for k in ("base", "matrix", "details", "losses")}

    def evaluate_base(self) -> None:
        self.state["base"], _ = evaluate_all(self.model, self.codec, self.tasks, self.cfg)

    def context(self, index: int) -> McitContext:
        return _context(index, self.tasks[index], len(self.tasks), self.codec, self.device, self.gen)

    def train(self, index: int, ctx: McitContext) -> None:
        self.state["losses"].append(train_task(self.model, self.codec, self.tasks[index], self.method, self.cfg,
                                               self.cfg.epochs_for(index), self.device, self.gen))

    def evaluate(self, index: int) -> list[float]:
        row, extra = evaluate_all(self.model, self.codec, self.tasks, self.cfg)
        self.state["matrix"].append(row)
        self.state["details"].append(extra)
        return row

    def checkpoint_state(self) -> dict:
        """The state after the tasks done, with the loop generator's state (a byte list) for a resumed run."""
        return {**self.state, "generator": self.gen.get_state().tolist()}


def run_sequence(model, codec: Codec, tasks: list[McitTask], method: McitMethod, cfg: LoopConfig,
                 profiler: Profiler, device, seed: int, start: dict | None = None,
                 on_task_end: Callable[[dict], None] | None = None, hooks: Hooks | None = None) -> dict:
    """Train ``method`` over ``tasks`` in order; returns the base row, the T x T matrix, caption details, losses.

    ``start`` (a resumed run): the state after ``len(start["matrix"])`` tasks, as :meth:`McitSteps.checkpoint_state`
    builds it; the model and method must already hold their state after those tasks. ``on_task_end(state)`` gets
    that state after every task (the runner's checkpoint), before ``hooks`` (the row printer, the tracker) report
    the row. The loop itself is :func:`clbench.engine.loop.run_tasks`.
    """
    steps = McitSteps(model, codec, tasks, method, cfg, profiler, device, seed, start, hooks)
    run_tasks(steps, len(steps.state["matrix"]), fresh=start is None,
              on_task_end=None if on_task_end is None else (lambda index: on_task_end(steps.checkpoint_state())))
    return steps.state
