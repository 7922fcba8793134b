"""iCaRL (Rebuffi et al., CVPR 2017) as ZSCL's MTIL baseline (Zheng et al., ICCV 2023; official code
Thunderbeee/ZSCL ``mtil/src/models/icarl.py``, ``mtil/src/dynamic_dataset.py``, ``mtil/scripts/icarl.sh``).

Full fine-tuning of both encoders with an exemplar memory of earlier tasks' training images, which enter
training only as distillation inputs: no exemplar is ever classified with a label.

Per training step of task t ≥ 1 the loss is ``CE_ls(task) + w_img·L_img + w_txt·L_txt`` [code]:

- ``CE_ls``: cross-entropy with label smoothing over the current task's CLIP logits (the FineTune loss).
- Reference model: a frozen copy of the *original* model (the code's ``--ref-model`` is unset, so it loads the
  pretrained CLIP), taken in :meth:`ICaRL.setup`, as ZSCL's.
- Reference texts: the *current* task's class prompts, encoded once per task by the reference model, ``e_ref``.
- Exemplar batch: the next ``replay_batch_size`` images of the memory (tasks in sequence order, each in herding
  order), read sequentially from its start at every task and wrapping round; the last chunk may be shorter
  (the code's ``batch(ref_images, batch_size)`` generator) [code].
- ``L_img``/``L_txt``: ZSCL's distillation (:func:`clbench.methods.zscl.distillation`, temperature T = 2) of the
  image→class and class→image distributions ``S = scale · f e_refᵀ`` of the current model's (``f_cur``) and the
  reference model's (``f_ref``) image features of the exemplar batch [code].

Cost, with the code's arithmetic unchanged: the current model encodes the task batch and the exemplar batch in one
image-tower call (CLIP normalises per sample — LayerNorm — so the features equal two calls' up to float rounding;
a backbone with BatchNorm in training mode gets two calls); the frozen reference's logits ``scale · f_ref e_refᵀ``
of the whole memory are computed once per task and sliced per batch, where the code re-runs the reference on every
exemplar batch (and re-encodes ``e_ref`` every step); the class prompts are tokenised once per task, as the
code's ``texts``, and encoded by the current model at every step, as the code.

Task 0 trains with ``CE_ls`` alone (the memory is empty; the code's ``pure_finetune``).

The exemplar memory (after each task, profiled as ``exemplar_selection``; budget K = ``memory_size`` images):

- Candidates: the first ``candidate_limit`` images of the task's training split, in split order [code:
  ``getNewDataset`` stops at 30000].
- Features: the L2-normalised image embeddings of the candidates by the model just trained on the task; their
  mean μ (not re-normalised) [code].
- Herding [code, = iCaRL's Algorithm 4]: p_1 = argmin_i ‖μ − f_i‖², then p_k = argmin_i ‖μ − (f_i + Σ_{j<k} f_{p_j})/k‖²
  over the candidates not yet chosen, ties to the lowest index; the memory keeps the herding order, so that
  reducing a task's share keeps its prefix (iCaRL's ReduceExemplarSet).
- Budget per task, not per class (the code herds each task's whole training set against one task mean): after
  t tasks every task keeps ``m = ⌊K / t⌋`` exemplars (fewer if it has fewer candidates) — iCaRL's
  ``m = K / t``, so the memory never holds more than K images.

Where this follows the iCaRL paper instead of the code, and why:

- Budget: the code reduces old tasks to ⌊K/t⌋ but gives the new task K − ⌊K/t⌋ (``constructExampleSet``), which
  exceeds K from the third task on (K + (t − 2)·⌊K/t⌋ images); we give every task ⌊K/t⌋, as iCaRL does.
- First task: the code stores the first K images of the first task in split order, unherded; we herd it like
  every later task.
- Exemplar images: the code's herding loop deletes the chosen feature row but indexes the undeleted image
  array with the reduced array's index, so from the second pick on it stores images shifted from the ones
  herding chose; we store the chosen ones.
- Evaluation is CLIP's text classifier, as the code's ``evaluate`` (not iCaRL's nearest-mean-of-exemplars,
  which could not score the datasets not trained yet: MTIL's Transfer needs every dataset).

Official recipe: ``icarl.sh`` as committed is a 5-iteration smoke script without ``--ls``, ``--image_loss`` or
``--text_loss`` — under it the memory has no effect on training at all, so it cannot be what produced the
published iCaRL row (which differs from fine-tuning's). ``--preset paper`` follows the recipe of its sibling
baselines ``lwf.sh``/``lwf_vr.sh`` instead: 1000 iterations, ``--ls 0.2``, ``--image_loss --text_loss``, and
``args.py``'s ``--memory_size 10000`` and ``--T 2``; the learning rates are the ones ``icarl.py`` sets itself
(5e-5 for Aircraft and MNIST, 1e-5 otherwise) [assumption].

State: the memory (``exemplar_images``, ``exemplar_labels`` and ``exemplar_tasks``, tensors grouped by task in
sequence order) is saved by :meth:`state_dict`, refused by :meth:`check_state` unless it is exactly what the
rule above leaves after the tasks done, and counted in ``state_bytes`` beside the frozen reference model.
The images are stored as ``memory_dtype`` (float16 halves the 6 GB of 10000 ViT-B/16 inputs in float32).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from clbench.datasets.base import Task
from clbench.errors import UserError
from clbench.methods.base import Method, TaskContext
from clbench.methods.recipes import RecipeCard, assumption, code, harness
from clbench.methods.registry import register_method
from clbench.methods.state_checks import StateMismatch, expect_keys, expect_tensor, extra_entry, tensor_entry
from clbench.methods.zscl import ZSCL_TRAINING, distillation, parse_lr_overrides
from clbench.models.clip import ClipModel

MEMORY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KEYS = ("exemplar_images", "exemplar_labels", "exemplar_tasks")
REFERENCE_CHUNK = 256  # memory images per reference forward when the teacher's logits are computed


@dataclass
class ICaRLHparams:
    memory_size: int = field(default=10_000, metadata={"min": 1})
    temperature: float = field(default=2.0, metadata={"min": 0.0, "exclusive_min": True})
    image_loss: float = field(default=1.0, metadata={"min": 0.0})
    text_loss: float = field(default=1.0, metadata={"min": 0.0})
    label_smoothing: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    lr_overrides: str = ""
    replay_batch_size: int = field(default=0, metadata={"min": 0})
    candidate_limit: int = field(default=30_000, metadata={"min": 1})
    memory_dtype: str = field(default="float32", metadata={"choices": tuple(MEMORY_DTYPES)})


# ---- pure pieces ---------------------------------------------------------------------------------------
def herding_order(features: Tensor, count: int) -> Tensor:
    """The first ``count`` picks of iCaRL's herding on ``features`` (n × d, one row per candidate).

    Pick k (1-based) is the unpicked row i minimising ``‖μ − (f_i + Σ_{j<k} f_{p_j}) / k‖²``, μ the mean of all
    rows; ties go to the lowest index."""
    n = features.shape[0]
    count = min(count, n)
    feats = features.double()  # the distances of near-equal candidates differ in the last float32 bits
    mu = feats.mean(0)
    total = torch.zeros_like(mu)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    order = []
    for k in range(1, count + 1):
        dist = (mu - (feats + total) / k).square().sum(1)
        dist[taken] = float("inf")
        i = int(torch.argmin(dist))
        order.append(i)
        taken[i] = True
        total += feats[i]
    return torch.tensor(order, dtype=torch.long)


def exemplar_counts(budget: int, candidates: list[int]) -> list[int]:
    """Exemplars each task keeps after ``len(candidates)`` tasks: ``⌊budget / t⌋``, or all its candidates if fewer."""
    share = budget // max(len(candidates), 1)
    return [min(share, n) for n in candidates]


def next_chunk(size: int, cursor: int, batch: int) -> tuple[slice, int]:
    """The memory rows of the next exemplar batch from ``cursor`` (sequential, wrapping round once the memory is
    exhausted; the last chunk of a pass may be shorter) and the cursor after it."""
    start = 0 if cursor >= size else cursor
    return slice(start, min(start + batch, size)), start + batch


# ---- the method ----------------------------------------------------------------------------------------
@register_method("icarl")
class ICaRL(Method):
    """iCaRL on CLIP (ZSCL's baseline): fine-tuning + distillation from the original CLIP on herded exemplars."""

    summary = "full fine-tuning with a herded exemplar memory distilled against the original CLIP"
    Hparams = ICaRLHparams

    def __init__(self, model: ClipModel, hparams: ICaRLHparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.reference: ClipModel | None = None
        shape = (0, 3, model.image_spec.size, model.image_spec.size)
        self.images = torch.zeros(shape, dtype=MEMORY_DTYPES[hparams.memory_dtype])
        self.labels = torch.zeros(0, dtype=torch.long)
        self.tasks = torch.zeros(0, dtype=torch.long)
        self.candidates: list[int] = []  # candidate count of every task done (its share's cap)
        self.ref_text: Tensor | None = None
        self.ref_logits: Tensor | None = None  # the teacher's logits of the memory under ref_text (per task)
        self.tokens: tuple[tuple[str, ...], Tensor] | None = None
        self.batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.cursor = 0
        self.task_name = ""

    # ---- configuration --------------------------------------------------------------------------
    def validate(self) -> None:
        try:
            parse_lr_overrides(self.hparams.lr_overrides)
        except UserError as exc:
            raise UserError(str(exc).replace("zscl.lr_overrides", "icarl.lr_overrides")) from None

    def setup(self) -> None:
        """Freeze a copy of the original model: the distillation teacher of every task."""
        self.validate()
        self.reference = copy.deepcopy(self.model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def params(self) -> list[nn.Parameter]:
        return self.model.encoder_parameters()

    def before_task(self, task: TaskContext) -> None:
        """Encode the current task's class prompts with the reference model; restart the exemplar stream."""
        if self.reference is None:
            if task.index:  # a copy of the current model would not be the original: refuse, never guess
                raise RuntimeError("iCaRL cannot start at a later task: its reference model (the original "
                                   "weights) is built by setup() before the first task and is not in its state")
            self.setup()
        with torch.no_grad(), self.profiler.section("reference_forward"):
            self.ref_text = self.reference.encode_text(self.reference.tokenize(task.prompts))
        self.ref_logits = None
        self.cursor = 0
        self.task_name = task.name

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict]:
        """The full encoders; a per-dataset learning rate goes in as the group's ``lr``."""
        lr = parse_lr_overrides(self.hparams.lr_overrides).get(self.task_name)
        return [{"params": self.params(), "lr": lr}] if lr is not None else self.params()

    def loss(self, images: Tensor, labels: Tensor, task: TaskContext) -> Tensor:
        """``CE_ls`` on the task batch, plus the weighted distillation on the next exemplar batch once the memory
        holds any. The current model encodes both batches in one call (CLIP's towers normalise per sample, so the
        features are those of two calls; two calls where a BatchNorm in training mode would mix the batches)."""
        hp = self.hparams
        text = self.model.encode_text(self.prompt_tokens(task.prompts))
        distil = len(self.images) > 0 and (hp.image_loss > 0 or hp.text_loss > 0)
        if not distil:
            features = self.model.encode_image(images)
        else:
            rows = self.next_rows(len(images))
            exemplars = self.images[rows].to(self.model.device, torch.float32, non_blocking=True)
            if any(m.training for m in self.batch_norms):
                features, f_cur = self.model.encode_image(images), self.model.encode_image(exemplars)
            else:
                both = self.model.encode_image(torch.cat([images.to(exemplars.dtype), exemplars]))
                features, f_cur = both[: len(images)], both[len(images):]
        logits = self.model.logit_scale() * features @ text.T
        total = F.cross_entropy(logits, labels, label_smoothing=hp.label_smoothing)
        if distil:
            img_loss, txt_loss = self.distillation_losses(self.reference_logits()[rows], f_cur)
            total = total + hp.image_loss * img_loss + hp.text_loss * txt_loss
        return total

    def prompt_tokens(self, prompts: list[str]) -> Tensor:
        """The tokens of ``prompts``, tokenised once per task (as the code's ``texts``; the encoding stays per step)."""
        key = tuple(prompts)
        if self.tokens is None or self.tokens[0] != key:
            self.tokens = (key, self.model.tokenize(prompts))
        return self.tokens[1]

    def next_rows(self, batch_size: int) -> slice:
        """The memory rows of the next exemplar batch (advancing the stream)."""
        rows, self.cursor = next_chunk(len(self.images), self.cursor, self.hparams.replay_batch_size or batch_size)
        return rows

    @torch.no_grad()
    def reference_logits(self) -> Tensor:
        """``S_ref = scale · f_ref e_refᵀ`` of every memory image (memory rows × current classes).

        The reference model is frozen and the memory is fixed during a task, so the teacher's logits of an
        exemplar are the same at every step: they are computed once per task (on first use, in chunks) instead of
        a reference forward per step, and sliced by the exemplar batch's rows."""
        if self.reference is None or self.ref_text is None:
            raise RuntimeError("ICaRL.setup() and before_task() must run before training")
        if self.ref_logits is None:
            with self.profiler.section("reference_forward"):
                scale, chunks = self.reference.logit_scale(), []
                for start in range(0, len(self.images), REFERENCE_CHUNK):
                    chunk = self.images[start:start + REFERENCE_CHUNK]
                    f_ref = self.reference.encode_image(chunk.to(self.model.device, torch.float32, non_blocking=True))
                    chunks.append(scale * f_ref @ self.ref_text.T)
                self.ref_logits = torch.cat(chunks) if chunks else torch.zeros(0, len(self.ref_text))
        return self.ref_logits

    def distillation_losses(self, s_ref: Tensor, f_cur: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_img, L_txt)`` of an exemplar batch: the reference's logits ``s_ref`` against the current model's
        image features ``f_cur`` scored on the reference texts of the current task."""
        if self.reference is None or self.ref_text is None:
            raise RuntimeError("ICaRL.setup() and before_task() must run before training")
        s_cur = self.reference.logit_scale() * f_cur @ self.ref_text.T
        t = self.hparams.temperature
        return distillation(s_ref, s_cur, t), distillation(s_ref.T, s_cur.T, t)

    @torch.no_grad()
    def after_task(self, task: TaskContext) -> None:
        """Shrink every earlier task's exemplars to its new share, then herd this task's own."""
        with self.profiler.section("exemplar_selection"):
            self.model.eval()
            limit, feats, count = self.hparams.candidate_limit, [], 0
            for images, _ in task.loader(shuffle=False):
                images = images[: limit - count]
                feats.append(self.model.encode_image(images.to(task.device, non_blocking=True)).float())
                count += len(images)
                if count >= limit:
                    break
            features = torch.cat(feats) if feats else torch.zeros(0, 1)
            counts = exemplar_counts(self.hparams.memory_size, [*self.candidates, len(features)])
            order = herding_order(features, counts[-1]).tolist()
            keep = torch.cat([torch.nonzero(self.tasks == t).flatten()[:c] for t, c in enumerate(counts[:-1])]
                             + [torch.zeros(0, dtype=torch.long)])
            chosen = task.make_loader(Subset(task.task.train, order), shuffle=False) if order else []
            pairs = [(images.to(self.images.dtype).cpu(), labels.long().cpu()) for images, labels in chosen]
            self.images = torch.cat([self.images[keep], *(im for im, _ in pairs)])
            self.labels = torch.cat([self.labels[keep], *(y for _, y in pairs)])
            self.tasks = torch.cat([self.tasks[keep], torch.full((len(order),), task.index, dtype=torch.long)])
            self.candidates.append(len(features))
            self.ref_logits = None

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"exemplar_images": self.images.contiguous(), "exemplar_labels": self.labels.contiguous(),
                "exemplar_tasks": self.tasks.contiguous()}

    def extra_state(self) -> dict:
        return {"candidates": list(self.candidates)}

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[Task]) -> None:
        """The memory the rule leaves after ``tasks``: per task, in sequence order, exactly ``min(⌊K/t⌋, its
        candidates)`` images of this model's input shape (finite, ``memory_dtype``), labels among its classes."""
        expect_keys(state, KEYS)
        expect_keys(extra, ("candidates",), entry=extra_entry)
        cands = extra["candidates"]
        limit = self.hparams.candidate_limit
        expected = [min(len(t.train), limit) for t in tasks]
        if (not isinstance(cands, list) or len(cands) != len(tasks)
                or not all(type(c) is int for c in cands) or cands != expected):
            raise StateMismatch(extra_entry("candidates"), f"is {cands!r:.60}, expected the candidate count of each "
                                                           f"task done ({expected})")
        images, labels, ids = (state[k] for k in KEYS)
        counts = exemplar_counts(self.hparams.memory_size, expected)
        total, size = sum(counts), self.model.image_spec.size
        expect_tensor("exemplar_images", images, shape=(total, 3, size, size),
                      dtype=MEMORY_DTYPES[self.hparams.memory_dtype], finite=True)
        expect_tensor("exemplar_labels", labels, shape=(total,), dtype=torch.long)
        expect_tensor("exemplar_tasks", ids, shape=(total,), dtype=torch.long)
        want = torch.cat([torch.full((c,), t, dtype=torch.long) for t, c in enumerate(counts)]
                         + [torch.zeros(0, dtype=torch.long)])
        if not torch.equal(ids, want):
            raise StateMismatch(tensor_entry("exemplar_tasks"), f"does not hold {counts} exemplars per task done, "
                                                                "in sequence order")
        classes = torch.tensor([len(tasks[t].classnames) for t in want.tolist()], dtype=torch.long)
        if bool(((labels < 0) | (labels >= classes)).any()):
            raise StateMismatch(tensor_entry("exemplar_labels"), "holds a label outside its task's classes")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.images, self.labels, self.tasks = (state[k].cpu() for k in KEYS)
        self.ref_logits = None

    def load_extra_state(self, extra: dict) -> None:
        self.candidates = list(extra.get("candidates", []))

    def state_bytes(self) -> dict[str, int]:
        out = {"exemplars": sum(t.numel() * t.element_size() for t in (self.images, self.labels, self.tasks))}
        if self.reference is not None:
            out["reference_model"] = sum(p.numel() * p.element_size() for p in self.reference.parameters())
        return out


# ---- recipe card (provenance under --preset paper; the values live in presets/paper.json and the defaults) ---------
RECIPES = {
    "icarl": RecipeCard(
        "iCaRL (Rebuffi et al., CVPR 2017) as ZSCL's MTIL baseline (Zheng et al., ICCV 2023), official code "
        "Thunderbeee/ZSCL mtil/src/models/icarl.py, mtil/src/dynamic_dataset.py",
        {"train.lr": code("icarl.py sets 1e-5 itself; its two exceptions are lr_overrides"),
         **ZSCL_TRAINING,
         "train.max_steps": assumption("1000 iterations as lwf.sh/ZSCL.sh: icarl.sh's --iterations 5 is a smoke run"),
         "memory_size": code("args.py --memory_size"),
         "temperature": code("args.py --T"),
         "image_loss": assumption("--image_loss as lwf.sh: icarl.sh omits it, leaving the memory without effect"),
         "text_loss": assumption("--text_loss as lwf.sh: icarl.sh omits it, leaving the memory without effect"),
         "label_smoothing": assumption("--ls 0.2 as every other MTIL script (icarl.sh omits it)"),
         "lr_overrides": code("icarl.py: Aircraft and MNIST at 5e-5"),
         "replay_batch_size": code("0 = the training batch size, as the code's exemplar batches"),
         "candidate_limit": code("dynamic_dataset.py getNewDataset stops at 30000 images"),
         "memory_dtype": harness("storage precision of the exemplar images (the code keeps float32)")}),
}
