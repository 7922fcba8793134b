"""LwF and LwF-VR on CLIP, as ZSCL's official MTIL code runs them (Zheng et al., ICCV 2023, Thunderbeee/ZSCL
``mtil/scripts/lwf.sh`` and ``lwf_vr.sh``; Learning without Forgetting: Li & Hoiem, ECCV 2016; LwF-VR, LwF with
a "virtual vocabulary": Ding et al., BMVC 2022).

Both scripts run ZSCL's distillation loop (``--method ZSCL --image_loss --text_loss``, no ``--l2``, no ``--we``)
with three inputs changed, and so does this file, composing :mod:`clbench.methods.zscl`'s pieces:

- **Teacher** = the *previous-task* model: ``--ref-model ckpt/<previous task>.pth``, and for the first task the
  pretrained CLIP, which is the model the first task starts from. So the teacher is always a frozen copy of the
  weights at the start of the current task, taken in :meth:`LwF.before_task` [code].
- **Reference images** = the *current task's* training split (``--ref-dataset <current task>``), read with the
  test transform (the code builds the reference dataset with ``test_preprocess``: no augmentation), shuffled
  and cycled independently of the task's own loader, one batch per step of the training batch size [code].
- **Reference texts**:
  * ``lwf``: the current task's class prompts (first template), the code's default when ``--ref-sentences``
    is not given (``ref_template(x) for x in ref_dataset.classnames``) [code];
  * ``lwf-vr`` (``--ref-sentences random``, ``helpers.virtual_vocab``): ``vr_texts`` = 1000 sequences of
    ``vr_length`` = 10 token ids drawn uniformly from the whole vocabulary (``torch.randint(0, len(encoder))``,
    so start/end ids may occur inside), each framed as ``[start, ids, end, 0 ...]`` [code]. The code draws them
    from torch's global generator seeded by ``--seed`` (42) in every task's process along the same path, so
    every task sees the same sequences, fixed by the seed. Here they are drawn once in :meth:`LwFVR.setup` from
    a generator seeded with the run's seed (``torch.initial_seed()``, which the runner sets to ``--seed``
    before setup), kept for every task and saved with the method state [code, our generator].

Per step, with ``e_t`` = the teacher's text embeddings of the reference texts (encoded once per task: the code
re-encodes them every iteration, with the same result since the teacher is frozen), ``f_t``/``f_s`` = teacher
and student image features of one reference batch, ``S_t = s·f_t e_tᵀ`` and ``S_s = s·f_s e_tᵀ`` (s = CLIP's
logit scale, 100):

    L = CE_ls(task) + image_loss · D(S_t, S_s) + text_loss · D(S_tᵀ, S_sᵀ)

with ``D(t, s) = T²·KL(softmax(t/T) ‖ softmax(s/T))`` (:func:`clbench.methods.zscl.distillation`, which has the
code's gradients; T = ``--T`` 2.0) and label smoothing 0.2. As in ZSCL's official loop both terms use the
teacher's text embeddings, so the student's text encoder is trained by the CE term only [code]. LwF's paper
distils the old model's outputs on the new task's images with the student's own head; ZSCL's code, which
produced the LwF and LwF-VR rows of every MTIL table, is the only definition of these baselines on CLIP, so it
is followed as written (no "paper" variant).

Per-dataset learning rates: both scripts train Aircraft and MNIST at 5e-5 and the others at 1e-5, exactly as
ZSCL (``lr_overrides``, ``--preset paper``); schedule and iteration budget are ZSCL's.

State and resume: nothing beyond the model weights is needed for LwF. The teacher is the model at the start of a
task, and a resumed run restores the weights saved after the previous task before :meth:`LwF.before_task`
copies them, so it rebuilds the same teacher (never the original model). LwF-VR saves its token ids (checked by
``check_state``). The reference stream is reseeded at every task from ``torch.initial_seed()``, which the harness
sets to a function of (run seed, task) just before ``before_task``, so a resumed run draws the same batches.
``state_bytes``: the teacher copy and its text embeddings (and the VR token ids). Cost centre:
``reference_forward`` (the teacher's forwards).

Speed, not math: the teacher is frozen for a task and the reference images are read without augmentation, so
``f_t`` of an image is the same at every draw; it is encoded the first time the image is drawn in a task and
served from memory after that (:class:`clbench.methods.zscl.FeatureMemo`; the code re-encodes every draw). A
reference split without a test transform to swap in is read as it is and re-encoded every draw.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from clbench.errors import UserError
from clbench.methods.base import Method, TaskContext
from clbench.methods.recipes import RecipeCard, code, harness
from clbench.methods.registry import register_method
from clbench.methods.state_checks import StateMismatch, check_like_fresh, tensor_entry
from clbench.methods.zscl import (
    REF_FEATURE_MEMO_BYTES,
    ZSCL_TRAINING,
    FeatureMemo,
    ReferenceImages,
    distillation,
    parse_lr_overrides,
)
from clbench.models.clip import ClipModel


@dataclass
class LwFHparams:
    temperature: float = field(default=2.0, metadata={"min": 0.0, "exclusive_min": True})
    image_loss: float = field(default=1.0, metadata={"min": 0.0})
    text_loss: float = field(default=1.0, metadata={"min": 0.0})
    label_smoothing: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    lr_overrides: str = ""
    ref_batch_size: int = field(default=0, metadata={"min": 0})
    ref_workers: int = field(default=4, metadata={"min": 0})


@dataclass
class LwFVRHparams(LwFHparams):
    vr_texts: int = field(default=1000, metadata={"min": 1})
    vr_length: int = field(default=10, metadata={"min": 1})


# ---- pure pieces ---------------------------------------------------------------------------------------
def frozen_copy(model: ClipModel) -> ClipModel:
    """A copy of ``model`` in eval mode with every parameter frozen (the teacher)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def reference_view(task) -> tuple[Dataset | Tensor, bool]:
    """The task's training split read with its test transform (the code's reference dataset: the current task
    built with ``test_preprocess``); in-memory splits (no transform) as one image tensor. The flag says whether an
    image reads the same at every draw (a tensor, or the test transform: no augmentation), so its teacher features
    may be memoised; a split without a transform to swap is read as it is, and not memoised."""
    train, test = task.train, task.test
    if isinstance(train, TensorDataset):
        return train.tensors[0], True
    if hasattr(train, "transform") and hasattr(test, "transform"):
        view = copy.copy(train)
        view.transform = test.transform
        return view, True
    return train, False


def vocabulary_size(model: ClipModel) -> int:
    """Number of token ids of the model's tokenizer (the code: ``len(clip._tokenizer.encoder)``)."""
    encoder = getattr(model.tokenizer, "encoder", None)
    if encoder is not None:
        return len(encoder)
    embedding = getattr(model.clip, "token_embedding", None)
    if isinstance(embedding, nn.Embedding):
        return embedding.num_embeddings
    raise UserError(f"lwf-vr: backbone {model.backbone!r} has no token vocabulary to draw from; use lwf instead")


def virtual_vocabulary(model: ClipModel, count: int, length: int, generator: torch.Generator) -> Tensor:
    """``count`` token sequences ``[start, length uniform ids from the whole vocabulary, end, 0, ...]`` at the
    model's context length (ZSCL's ``helpers.virtual_vocab``)."""
    empty = model.tokenize([""])[0].cpu()  # [start, end, 0, ...]: the framing ids and the context length
    context = empty.shape[0]
    if length + 2 > context:
        raise UserError(f"lwf-vr.vr_length={length} does not fit the text context of {context} tokens with its start "
                        f"and end tokens; pass --set lwf-vr.vr_length={context - 2} or less")
    ids = torch.randint(0, vocabulary_size(model), (count, length), generator=generator)
    out = torch.zeros(count, context, dtype=torch.long)
    out[:, 0] = empty[0]
    out[:, 1 : length + 1] = ids
    out[:, length + 1] = empty[1]
    return out


# ---- the methods ---------------------------------------------------------------------------------------
@register_method("lwf")
class LwF(Method):
    """LwF: distillation from the previous-task model on the current task's images and class prompts."""

    summary = "full fine-tuning with distillation from the previous-task model on the current task (ZSCL's LwF)"
    Hparams = LwFHparams

    def __init__(self, model: ClipModel, hparams: LwFHparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.teacher: ClipModel | None = None
        self.ref_images: ReferenceImages | None = None
        self.ref_features: FeatureMemo | None = None  # f_t of the reference images seen in this task
        self.ref_text: Tensor | None = None  # e_t: the teacher's embeddings of the reference texts
        self.task_name = ""

    def validate(self) -> None:
        parse_lr_overrides(self.hparams.lr_overrides, self.name)

    def setup(self) -> None:
        self.validate()

    def params(self) -> list[nn.Parameter]:
        return self.model.encoder_parameters()

    def reference_tokens(self, task: TaskContext) -> Tensor:
        """LwF: the current task's class prompts (first template)."""
        return self.model.tokenize(task.prompts)

    def before_task(self, task: TaskContext) -> None:
        """Teacher = a frozen copy of the weights now (the previous task's model); its reference-text embeddings;
        a fresh reference stream over this task's training images."""
        hp = self.hparams
        self.task_name = task.name
        self.teacher = None  # free the previous teacher before copying
        self.teacher = frozen_copy(self.model)
        with torch.no_grad(), self.profiler.section("reference_forward"):
            self.ref_text = self.teacher.encode_text(self.reference_tokens(task).to(self.model.device))
        data, fixed = reference_view(task.task)
        workers = 0 if isinstance(data, Tensor) else hp.ref_workers
        # batch size 0 = that of the task's first training batch (set at the first step, before the first draw)
        self.ref_images = ReferenceImages(data, hp.ref_batch_size, torch.initial_seed(), workers)
        # the teacher is frozen for the task: an image read without augmentation has the same f_t at every draw
        self.ref_features = FeatureMemo(len(self.ref_images), REF_FEATURE_MEMO_BYTES if fixed else 0)

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict]:
        """The full encoders; a per-dataset learning rate goes in as the group's ``lr``."""
        lr = parse_lr_overrides(self.hparams.lr_overrides, self.name).get(self.task_name)
        return [{"params": self.params(), "lr": lr}] if lr is not None else self.params()

    def loss(self, images: Tensor, labels: Tensor, task: TaskContext) -> Tensor:
        hp = self.hparams
        text = self.model.encode_text(self.model.tokenize(task.prompts))
        distill = hp.image_loss > 0 or hp.text_loss > 0
        if not distill:
            logits = self.model.logit_scale() * self.model.encode_image(images) @ text.T
            return F.cross_entropy(logits, labels, label_smoothing=hp.label_smoothing)
        # the task batch and the reference batch in one pass of the student's image encoder (the same features as
        # two passes; one call is cheaper on small batches)
        rows, ref = self.reference_batch(len(images))
        features = self.model.encode_image(torch.cat([images, ref]))
        logits = self.model.logit_scale() * features[: len(images)] @ text.T
        total = F.cross_entropy(logits, labels, label_smoothing=hp.label_smoothing)
        img_loss, txt_loss = self.distillation_terms(rows, ref, features[len(images) :])
        return total + hp.image_loss * img_loss + hp.text_loss * txt_loss

    def reference_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The next batch of the reference stream as ``(indices into the set, images on the model's device)``."""
        if self.teacher is None or self.ref_images is None or self.ref_text is None:
            raise RuntimeError(f"{self.name}: before_task() must run before training (it builds the teacher)")
        if not self.ref_images.batch_size:
            self.ref_images.batch_size = batch_size
        rows, images = self.ref_images.next_indexed()
        return rows, images.to(self.model.device, non_blocking=True)

    def distillation_losses(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``(D(S_t, S_s), D(S_tᵀ, S_sᵀ))`` on the next reference batch (see the module docstring)."""
        rows, images = self.reference_batch(batch_size)
        return self.distillation_terms(rows, images, self.model.encode_image(images))

    def distillation_terms(self, rows: Tensor, images: Tensor, f_s: Tensor) -> tuple[Tensor, Tensor]:
        """The two terms on reference ``images`` (rows ``rows`` of the set), whose student features are ``f_s``."""
        scale = self.teacher.logit_scale()
        with torch.no_grad(), self.profiler.section("reference_forward"):
            f_t = self.ref_features(rows, images, self.teacher.encode_image)
        s_t, s_s = scale * f_t @ self.ref_text.T, scale * f_s @ self.ref_text.T
        T = self.hparams.temperature
        return distillation(s_t, s_s, T), distillation(s_t.T, s_s.T, T)

    def state_bytes(self) -> dict[str, int]:
        out = {}
        if self.teacher is not None:
            out["teacher_model"] = sum(t.numel() * t.element_size()
                                       for t in [*self.teacher.parameters(), *self.teacher.buffers()])
        if self.ref_text is not None:
            out["reference_text"] = self.ref_text.numel() * self.ref_text.element_size()
        return out


@register_method("lwf-vr")
class LwFVR(LwF):
    """LwF-VR: LwF whose reference texts are random token sequences (a virtual vocabulary)."""

    summary = "LwF with 1000 random 10-token texts as the distillation vocabulary (ZSCL's LwF-VR)"
    Hparams = LwFVRHparams

    def __init__(self, model: ClipModel, hparams: LwFVRHparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.vr_tokens: Tensor | None = None

    def setup(self) -> None:
        """Draw the virtual vocabulary once, from the run's seed (the same texts for every task)."""
        super().setup()
        gen = torch.Generator().manual_seed(torch.initial_seed())
        self.vr_tokens = virtual_vocabulary(self.model, self.hparams.vr_texts, self.hparams.vr_length, gen)

    def reference_tokens(self, task: TaskContext) -> Tensor:
        if self.vr_tokens is None:
            raise RuntimeError("lwf-vr: setup() must run before the first task (it draws the virtual vocabulary)")
        return self.vr_tokens

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.vr_tokens is None else {"vr_tokens": self.vr_tokens}

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks) -> None:
        """The token ids of the shape drawn now, each a valid id of the vocabulary."""
        check_like_fresh(state, extra, self.state_dict(), self.extra_state())
        tokens = state["vr_tokens"]
        vocab = vocabulary_size(self.model)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise StateMismatch(tensor_entry("vr_tokens"), f"holds ids outside the vocabulary [0, {vocab})")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"vr_tokens"}:
            raise ValueError(f"lwf-vr state must hold exactly vr_tokens, got {sorted(state)}")
        self.vr_tokens = state["vr_tokens"].detach().cpu().clone()

    def state_bytes(self) -> dict[str, int]:
        out = super().state_bytes()
        if self.vr_tokens is not None:
            out["vr_tokens"] = self.vr_tokens.numel() * self.vr_tokens.element_size()
        return out


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json and the defaults) --------
_LWF_SETTINGS = {
    "train.lr": code("lwf.sh / lwf_vr.sh: 1e-5, with the two exceptions in lr_overrides"),
    **ZSCL_TRAINING,
    "temperature": code("--T (args.py default)"),
    "image_loss": code("--image_loss (weight 1)"),
    "text_loss": code("--text_loss (weight 1)"),
    "label_smoothing": code("--ls"),
    "lr_overrides": code("Aircraft and MNIST at 5e-5 in the scripts' lr list"),
    "ref_batch_size": code("0 = the training batch size, as the code's reference loader"),
    "ref_workers": harness("data-loader workers for the reference images"),
}
RECIPES = {
    "lwf": RecipeCard(
        "LwF (Li & Hoiem, ECCV 2016) as ZSCL's MTIL baseline (Zheng et al., ICCV 2023), official code "
        "Thunderbeee/ZSCL mtil/scripts/lwf.sh: teacher = previous-task model, reference data = current task, "
        "reference text = current class prompts", _LWF_SETTINGS),
    "lwf-vr": RecipeCard(
        "LwF-VR (Ding et al., BMVC 2022) as ZSCL's MTIL baseline, official code Thunderbeee/ZSCL "
        "mtil/scripts/lwf_vr.sh (--ref-sentences random: helpers.virtual_vocab)",
        {**_LWF_SETTINGS,
         "vr_texts": code("virtual_vocab n_class"),
         "vr_length": code("virtual_vocab length")}),
}
