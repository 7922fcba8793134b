"""ZSCL (Zheng et al., ICCV 2023): full fine-tuning with distillation from the original CLIP on reference
data, an L2 weight constraint and weight ensembling (official code
Thunderbeee/ZSCL, ``mtil/``).

Per training step the loss is ``CE_ls(task) + w_img·L_img + w_txt·L_txt + l2·L_WC``:

- ``CE_ls``: cross-entropy with label smoothing 0.2 over the current task's CLIP logits [code].
- Reference model: a frozen copy of the *original* model, taken in :meth:`ZSCL.setup` [code].
- Reference data: a batch of reference images per step (cycled independently of the task loader) and a
  fixed set of reference captions, whose reference-model text embeddings ``e_ref`` are encoded once per
  setup and cached (the code re-encodes them every iteration; the result is identical) [code].
- ``L_img``/``L_txt``: distillation with temperature T = 2 of the image→caption and caption→image
  similarity distributions, ``S = scale · f gᵀ`` with the reference model's logit scale. The loss is the
  KL form ``T²·KL(softmax(S_ref/T) ‖ softmax(S_cur/T))``: it equals the code's
  ``T²·CE(S_cur/T, softmax(S_ref/T))`` minus the target's entropy, a constant, so gradients are identical
  and the loss is exactly zero when the model equals the reference.

  * ``text_distill="official"`` (default, the algorithm behind ZSCL's published numbers): both terms use
    the frozen reference text embeddings of *all* captions and only the current image features,
    ``S_ref = f_ref e_refᵀ``, ``S_cur = f_cur e_refᵀ``; the text encoder gets no distillation gradient [code].
  * ``text_distill="paper"`` (a variant, ``--set zscl.text_distill=paper``; our reading of the paper's text):
    the current model's similarities use the current image *and* current text encoder,
    ``S_cur = f_cur g_curᵀ``, on ``ref_text_batch`` captions sampled per step (0 = all), against
    ``S_ref = f_ref e_refᵀ`` on the same captions. The text encoder thus receives distillation gradients,
    which the official code never produces; the per-step caption sample is our choice [assumption]:
    encoding every reference caption with gradients at every step is unaffordable on MTIL.

- ``L_WC = Σ_θ ‖θ − θ_start‖²`` over the trained weights, θ_start = the weights at the start of the task [code].
- Weight ensemble (WE): a running uniform average of θ_start and the weights after every step with
  ``step % avg_freq == 0`` (and after the last step, which is a multiple of ``avg_freq`` in the official
  1000-iteration schedule); training continues from θ, and the ensemble is loaded into the model after
  the task, so it is what is evaluated and what the next task starts from [code].

Reference data. On the embedded synthetic benchmark: held-out images and captions of the tiny backbone's
pretraining corpus (:func:`clbench.models.pretrain.sample_corpus` with seed ``ref_seed``, which differs from
pretraining's, normalised like the benchmark). On MTIL: ``ref_images`` (an ImageFolder root, e.g. ImageNet
train; read with the test transform, no augmentation) and ``ref_captions`` (a CSV/TSV file, e.g. the
Conceptual Captions validation file with its ``title`` column); missing options are a :class:`UserError`.

Per-dataset learning rates (5e-5 for Aircraft and MNIST, 1e-5 for the others in the paper's MTIL runs):
the run's rate is ``zscl.train.lr`` and the exceptions are ``zscl.lr_overrides=Aircraft:5e-5,MNIST:5e-5``
(matched against the task's name; an optimiser group learning rate, which the harness's schedule uses as
that group's peak). ``--preset paper`` sets both, with ZSCL's schedule: 1000 iterations, linear warm-up over
100 steps, then cosine decay to 0 (``train.schedule=cosine``, ``train.warmup_steps=100``;
:mod:`clbench.engine.schedules`) [code].

Cost centres: ``reference_forward`` (the frozen model's forwards: caption cache and reference images). The
reference model's features of a reference image are encoded the first time it is drawn in a task and served
from memory after that (:class:`FeatureMemo`: the model is frozen and the images are read without augmentation,
so they cannot change; the code re-encodes every draw; sets whose features would pass 512 MiB are re-encoded).
State between tasks: the frozen reference model and the caption embeddings (``state_bytes``). Neither is
saved by ``state_dict``: ``setup()`` rebuilds both from the pretrained weights (the runner calls it before
restoring a checkpoint), and ``before_task`` refuses to start at a later task without it rather than take
the current weights as the reference. The reference-image order and the caption sample are reseeded from
``(ref_seed, task)`` at every task, so a resumed run draws the same reference batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.errors import UserError
from clbench.methods.base import Method, TaskContext
from clbench.methods.recipes import RecipeCard, adapted, assumption, code, harness
from clbench.methods.registry import register_method
from clbench.models.clip import ClipModel

CAPTION_COLUMNS = ("title", "caption", "captions", "text", "sentence")
EMBEDDED_REF_SEED = 20_231_001  # pretraining draws with seed 0; this is a different, fixed stream


@dataclass
class ZSCLHparams:
    text_distill: str = field(default="official", metadata={"choices": ("official", "paper")})
    temperature: float = field(default=2.0, metadata={"min": 0.0, "exclusive_min": True})
    image_loss: float = field(default=1.0, metadata={"min": 0.0})
    text_loss: float = field(default=1.0, metadata={"min": 0.0})
    l2: float = field(default=1.0, metadata={"min": 0.0})
    avg_freq: int = field(default=100, metadata={"min": 0})
    label_smoothing: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    lr_overrides: str = ""
    ref_images: str = ""
    ref_captions: str = ""
    ref_caption_column: str = ""
    ref_batch_size: int = field(default=0, metadata={"min": 0})
    ref_text_batch: int = field(default=256, metadata={"min": 0})  # text_distill=paper only
    ref_image_count: int = field(default=1024, metadata={"min": 1})
    ref_caption_count: int = field(default=2048, metadata={"min": 1})
    ref_seed: int = field(default=EMBEDDED_REF_SEED, metadata={"min": 0})
    ref_workers: int = field(default=4, metadata={"min": 0})


# ---- pure pieces ---------------------------------------------------------------------------------------
def distillation(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, mean over rows (zero when the logits agree)."""
    target = F.log_softmax(teacher / temperature, dim=-1)
    pred = F.log_softmax(student / temperature, dim=-1)
    kl = (target.exp() * (target - pred)).sum(-1)
    return kl.mean() * temperature**2


class _WeightDistance(torch.autograd.Function):
    """``Σ ‖θ − θ_start‖²`` with its gradient ``2(θ − θ_start)``, in one pass over each tensor."""

    @staticmethod
    def forward(ctx, start: list[Tensor], *params: Tensor) -> Tensor:
        diffs = torch._foreach_sub([p.detach() for p in params], start)
        ctx.save_for_backward(*diffs)
        return torch.stack([d.square().sum() for d in diffs]).sum()  # pairwise sums: accurate to 1e-8

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *torch._foreach_mul(list(ctx.saved_tensors), 2 * grad))


def weight_distance(params: list[Tensor], start: list[Tensor]) -> Tensor:
    """``Σ ‖θ − θ_start‖²`` (ZSCL's WC term, sum-reduced over all entries), differentiable in ``params``.

    Written as one autograd function because it runs over every weight at every step: autograd's elementwise
    graph took longer than the tiny backbone's whole forward and backward (130 ms against 45 ms on one CPU
    thread); the gradient is the same, the value agrees to float rounding."""
    if len(params) != len(start):
        raise ValueError(f"weight_distance: {len(params)} parameters but {len(start)} starting points")
    return _WeightDistance.apply(start, *params)


def running_average(avg: list[Tensor], new: list[Tensor], count: int) -> None:
    """In place ``avg ← (avg·count + new)/(count + 1)``: the uniform mean of ``count + 1`` snapshots."""
    with torch.no_grad():
        for a, p in zip(avg, new, strict=True):
            a.mul_(count / (count + 1)).add_(p.detach(), alpha=1 / (count + 1))


def parse_lr_overrides(spec: str, owner: str = "zscl") -> dict[str, float]:
    """``"Aircraft:5e-5,MNIST:5e-5"`` → ``{"Aircraft": 5e-5, "MNIST": 5e-5}`` (``=`` also accepted); ``owner`` is
    the method whose option it is (named in the error)."""
    out: dict[str, float] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, value = item.replace("=", ":").rpartition(":")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if not sep or not name.strip() or not lr > 0:
            raise UserError(f"{owner}.lr_overrides: {item!r} is not DATASET:LR with LR > 0, "
                            f"e.g. --set {owner}.lr_overrides=Aircraft:5e-5,MNIST:5e-5")
        out[name.strip()] = lr
    return out


def read_captions(path: Path, column: str = "") -> list[str]:
    """Captions from a CSV/TSV file (tab-separated if its first line has a tab), non-empty, in file order.

    ``column`` names the caption column; empty picks the first of ``title``, ``caption``, ``text``...;
    a number selects that column of a file without a header row (e.g. the raw Conceptual Captions TSV).
    """
    import pandas as pd

    if not path.is_file():
        raise UserError(f"zscl.ref_captions={path} is not a file; pass a CSV/TSV of captions "
                        "(--set zscl.ref_captions=/path/Validation_GCC-1.1.0-Validation_output.csv)")
    with path.open(encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    sep = "\t" if "\t" in first else ","
    try:
        if column.isdigit():
            frame = pd.read_csv(path, sep=sep, header=None, dtype=str, quoting=3 if sep == "\t" else 0)
            if int(column) >= frame.shape[1]:
                raise UserError(f"zscl.ref_caption_column={column}: {path} has {frame.shape[1]} columns")
            series = frame.iloc[:, int(column)]
        else:
            frame = pd.read_csv(path, sep=sep, dtype=str, quoting=3 if sep == "\t" else 0)
            names = [column] if column else [c for c in CAPTION_COLUMNS if c in frame.columns][:1]
            if not names or names[0] not in frame.columns:
                raise UserError(f"{path} has no caption column ({', '.join(map(str, frame.columns))}); name it with "
                                "--set zscl.ref_caption_column=NAME, or a column number for a file without header")
            series = frame[names[0]]
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"cannot read captions from {path} ({type(exc).__name__}); pass a CSV/TSV file") from None
    captions = [str(c).strip() for c in series.dropna().tolist() if str(c).strip()]
    if not captions:
        raise UserError(f"{path} holds no captions; pass a file with one caption per row")
    return captions


def embedded_reference(model: ClipModel, images: int, captions: int, seed: int) -> tuple[Tensor, list[str]]:
    """Held-out pretraining-corpus images (normalised like the benchmark) and its distinct captions."""
    from clbench.models.pretrain import sample_corpus

    spec = model.image_spec
    gen = torch.Generator().manual_seed(seed)
    pixels, _ = sample_corpus(images, spec.size, gen)
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    _, texts = sample_corpus(captions, spec.size, gen)
    return (pixels - mean) / std, list(dict.fromkeys(texts))


REF_MEMORY_BYTES = 256 * 2**20  # a reference image set up to this size (as float32 tensors) is read once into memory


class _PlannedBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches are set before each pass (so a persistent loader can serve every pass)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class ReferenceImages:
    """An endless, seeded, shuffled stream of reference-image batches (independent of the task loader).

    Each pass is ``torch.randperm`` of the set drawn from the stream's generator, cut into batches (for an image
    folder the last, partial batch is dropped when the set holds at least one batch, as ZSCL's loader). An image
    folder whose decoded images fit in ``memory_bytes`` is read once, with ``workers`` processes, and then served
    from memory; a larger one is read by one loader with ``workers`` persistent processes, kept for every pass of
    a task (:meth:`close` stops them; ZSCL's code and clbench before started new workers each pass: with a small
    set, every step). Both give the same batches."""

    def __init__(self, data: Tensor | torch.utils.data.Dataset, batch_size: int, seed: int, workers: int = 0,
                 memory_bytes: int = REF_MEMORY_BYTES):
        self.batch_size, self.workers = batch_size, workers
        self.drop_last = not isinstance(data, Tensor)
        self.gen = torch.Generator().manual_seed(seed)
        self._it: Iterator | None = None
        self._sampler = _PlannedBatches()
        self._loader: torch.utils.data.DataLoader | None = None
        self.data: Tensor | torch.utils.data.Dataset = data
        if not isinstance(data, Tensor) and len(data) and _decoded_bytes(data) * len(data) <= memory_bytes:
            self.data = self._read_all(data)

    def __len__(self) -> int:
        return len(self.data)

    def _read_all(self, data: torch.utils.data.Dataset) -> Tensor:
        """Every image of ``data``, decoded once (in order, ``workers`` processes), as one tensor."""
        loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=False, num_workers=self.workers)
        return torch.cat([images for images, _ in loader])

    def reseed(self, seed: int) -> None:
        """Start a fresh shuffled pass drawn from ``seed``."""
        self.gen.manual_seed(seed)
        self._it = None

    def close(self) -> None:
        """Stop the loader's worker processes (a later pass starts new ones); the stream stays usable."""
        self._it = None
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()  # idempotent; torch has no public call for a persistent loader
        self._loader = None

    def _plan(self) -> list[list[int]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.gen).tolist()
        size = self.batch_size
        stop = n - n % size if self.drop_last and n >= size else n
        return [order[i : min(i + size, stop)] for i in range(0, stop, size)]

    def _epoch(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass. The iterator holds no reference to ``self``: dropping the stream frees its loader (and stops
        its workers) at once, never later in a process forked meanwhile."""
        batches = self._plan()
        if isinstance(self.data, Tensor):
            return _rows(self.data, batches)
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(self.data, batch_sampler=self._sampler,
                                                       num_workers=self.workers,
                                                       persistent_workers=self.workers > 0)
        self._sampler.batches = batches
        return ((torch.tensor(batch, dtype=torch.long), images)
                for batch, (images, _) in zip(batches, self._loader, strict=True))

    def next(self) -> Tensor:
        """The next batch of images."""
        return self.next_indexed()[1]

    def next_indexed(self) -> tuple[Tensor, Tensor]:
        """The next batch as ``(indices into the set, images)`` (the indices key a :class:`FeatureMemo`)."""
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch()
            batch = next(self._it, None)
            if batch is not None:
                return batch
            self._it = None
        raise RuntimeError("the reference image set is empty")


def _rows(data: Tensor, batches: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in batches:
        yield torch.tensor(batch, dtype=torch.long), data[batch]


REF_FEATURE_MEMO_BYTES = 512 * 2**20  # a frozen model's features of a reference set up to this size are memoised


class FeatureMemo:
    """A frozen encoder's features of a fixed reference image set, each image encoded the first time it is drawn
    and served from memory after that.

    Exact reuse, not an approximation: while the memo lives the encoder is frozen and the images are read without
    augmentation (the reference sets are read with the test transform), so an image's features cannot change. The
    owner clears it whenever either may change (every task, which also keeps a resumed run's draws identical). A
    set whose table would pass ``max_bytes`` is not memoised: every draw is encoded, as the official code does."""

    def __init__(self, size: int, max_bytes: int = REF_FEATURE_MEMO_BYTES) -> None:
        self.size, self.max_bytes = size, max_bytes
        self.table: Tensor | None = None
        self.known: Tensor | None = None

    def clear(self) -> None:
        """Forget every stored feature (the encoder or the images are about to change)."""
        self.table, self.known = None, None

    def __call__(self, indices: Tensor, images: Tensor, encode) -> Tensor:
        """The features of ``images`` (the set's rows ``indices``, no repeats), encoding only those not seen yet."""
        if self.table is None or self.known is None:
            features = encode(images)
            if self.size * features[0].numel() * features.element_size() > self.max_bytes:
                return features  # too large to keep: the next draw is encoded (and measured) again
            self.table = features.new_zeros((self.size, *features.shape[1:]))
            self.known = torch.zeros(self.size, dtype=torch.bool)
            self.table[indices.to(features.device)] = features
            self.known[indices] = True
            return features
        new = ~self.known[indices]
        if bool(new.any()):
            fresh = indices[new]
            self.table[fresh.to(self.table.device)] = encode(images[new.to(images.device)])
            self.known[fresh] = True
        return self.table[indices.to(self.table.device)]


def _decoded_bytes(data: torch.utils.data.Dataset) -> int:
    """Bytes of one decoded image of ``data`` (its first), as the loader hands it over."""
    image, _ = data[0]
    return image.numel() * image.element_size()


def reference_workers(requested: int) -> int:
    """Loader processes for the reference images: ``zscl.ref_workers``, at most torch's thread count (``--threads``)."""
    return max(0, min(requested, torch.get_num_threads()))


def image_folder(root: Path, model: ClipModel, option: str = "zscl.ref_images",
                 example: str = "ImageNet train (--set zscl.ref_images=/data/ImageNet/train)"
                 ) -> torch.utils.data.Dataset:
    """An ImageFolder read with the backbone's test transform (:func:`clbench.datasets.mtil.clip_transform`);
    ``option`` names the setting that gave ``root`` in errors (MoE-Adapters reads its reference set here too),
    ``example`` says what to pass instead."""
    from torchvision import datasets

    if not root.is_dir():
        raise UserError(f"{option}={root} is not a folder; pass an ImageFolder root such as {example}")
    from clbench.datasets.mtil import ImageView, clip_transform

    transform = clip_transform(model.image_spec)  # the backbone's test transform (its tag's preprocessing)

    try:
        folder = datasets.ImageFolder(str(root))  # PIL images, decoded one by one by the view below
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{option}={root}: {exc}; pass a folder of class sub-folders of images") from None
    # the rule of every image reader: an unreadable file is one line naming it (never a DataLoader traceback)
    return ImageView(option, folder, list(range(len(folder))), transform,
                     fix="replace or remove it in the reference image folder")


# ---- the method ----------------------------------------------------------------------------------------
@register_method("zscl")
class ZSCL(Method):
    """ZSCL: distillation from the original CLIP on reference data + weight constraint + weight ensemble."""

    summary = "full fine-tuning with reference-data distillation, L2 to the task start and weight ensembling"
    Hparams = ZSCLHparams

    def __init__(self, model: ClipModel, hparams: ZSCLHparams, profiler) -> None:
        super().__init__(model, hparams, profiler)
        self.reference: ClipModel | None = None
        self.ref_images: ReferenceImages | None = None
        self.ref_features: FeatureMemo | None = None  # f_ref of the reference images seen in this task
        self.captions: list[str] = []
        self.caption_tokens: Tensor | None = None
        self.ref_text: Tensor | None = None  # e_ref: reference-model embeddings of every caption
        self.text_encodings = 0  # how many times e_ref was computed (once per setup)
        self.start: list[Tensor] = []
        self.ensemble: list[Tensor] = []
        self.snapshots = 0
        self.task_name = ""
        self._caption_gen = torch.Generator().manual_seed(hparams.ref_seed + 1)

    # ---- configuration --------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the options before anything runs: reference data for real benchmarks, LR overrides."""
        hp = self.hparams
        parse_lr_overrides(hp.lr_overrides)
        if hp.text_distill == "official" and hp.ref_text_batch != ZSCLHparams.ref_text_batch:
            raise UserError(f"zscl.ref_text_batch={hp.ref_text_batch} has no effect with text_distill=official (it "
                            "distils against every caption); drop it, or add --set zscl.text_distill=paper")
        if bool(hp.ref_images) != bool(hp.ref_captions):
            raise UserError("zscl needs both reference images and captions: pass --set zscl.ref_images=... "
                            "--set zscl.ref_captions=... (or neither, on the embedded benchmark)")
        if not hp.ref_images and self.benchmark != "synthetic":
            raise UserError(f"zscl on {self.benchmark} needs reference data: pass --set zscl.ref_images=IMAGEFOLDER "
                            "(e.g. ImageNet train) --set zscl.ref_captions=CAPTIONS.csv (e.g. Conceptual Captions val)")
        if hp.ref_images:
            if not Path(hp.ref_images).is_dir():
                raise UserError(f"zscl.ref_images={hp.ref_images} is not a folder; pass an ImageFolder root "
                                "(--set zscl.ref_images=/data/ImageNet/train)")
            if not Path(hp.ref_captions).is_file():
                raise UserError(f"zscl.ref_captions={hp.ref_captions} is not a file; pass a CSV/TSV of captions "
                                "(--set zscl.ref_captions=/data/Validation_GCC-1.1.0-Validation_output.csv)")

    # ---- lifecycle ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Freeze a copy of the original model; load the reference data; cache ``e_ref`` once."""
        self.validate()
        hp, model = self.hparams, self.model
        self.reference = copy.deepcopy(model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        seed = hp.ref_seed
        if hp.ref_images:
            images: Tensor | torch.utils.data.Dataset = image_folder(Path(hp.ref_images), model)
            self.captions = read_captions(Path(hp.ref_captions), hp.ref_caption_column)
        else:
            images, self.captions = embedded_reference(model, hp.ref_image_count, hp.ref_caption_count, seed)
        self.ref_images = ReferenceImages(images, hp.ref_batch_size or 64, seed, reference_workers(hp.ref_workers))
        self.ref_features = FeatureMemo(len(self.ref_images))
        self.caption_tokens = model.tokenize(self.captions)
        self.ref_text = None
        self.encode_reference_text()

    def encode_reference_text(self, batch_size: int = 512) -> Tensor:
        """``e_ref``: the frozen model's embeddings of every reference caption (computed once, cached)."""
        if self.ref_text is None:
            ref, tokens = self._reference(), self.caption_tokens
            with torch.no_grad(), self.profiler.section("reference_forward"):
                self.ref_text = torch.cat([ref.encode_text(tokens[i : i + batch_size])
                                           for i in range(0, len(tokens), batch_size)])
            self.text_encodings += 1
        return self.ref_text

    def _reference(self) -> ClipModel:
        if self.reference is None:
            raise RuntimeError("ZSCL.setup() must run before training (it builds the reference model)")
        return self.reference

    def params(self) -> list[nn.Parameter]:
        return self.model.encoder_parameters()

    def before_task(self, task: TaskContext) -> None:
        """θ_start (for WC) and the ensemble's first snapshot are the task's starting weights."""
        if self.reference is None:
            if task.index:  # a copy of the current model would not be the original: refuse, never guess
                raise RuntimeError("ZSCL cannot start at a later task: its reference model (the original "
                                   "weights) is built by setup() before the first task and is not in its state")
            self.setup()
        self.encode_reference_text()
        # what a task draws depends on (ref_seed, task) only, so a resumed run draws the same batches
        seed = self.hparams.ref_seed * 1_000 + task.index
        self.ref_images.reseed(seed)
        self.ref_features.clear()  # per task, so a resumed task encodes exactly what the uninterrupted one did
        self._caption_gen.manual_seed(seed + 1)
        self.start = [p.detach().clone() for p in self.params()]
        self.ensemble = [p.detach().clone() for p in self.params()]
        self.snapshots = 1
        self.task_name = task.name

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict]:
        """The full encoders; a per-dataset learning rate goes in as the group's ``lr``."""
        lr = parse_lr_overrides(self.hparams.lr_overrides).get(self.task_name)
        return [{"params": self.params(), "lr": lr}] if lr is not None else self.params()

    def loss(self, images: Tensor, labels: Tensor, task: TaskContext) -> Tensor:
        hp = self.hparams
        text = self.model.encode_text(self.model.tokenize(task.prompts))
        logits = self.model.logit_scale() * self.model.encode_image(images) @ text.T
        total = F.cross_entropy(logits, labels, label_smoothing=hp.label_smoothing)
        if hp.image_loss > 0 or hp.text_loss > 0:
            img_loss, txt_loss = self.distillation_losses(len(images))
            total = total + hp.image_loss * img_loss + hp.text_loss * txt_loss
        if hp.l2 > 0:
            total = total + hp.l2 * weight_distance(self.params(), self.start)
        return total

    def distillation_losses(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``(L_img, L_txt)`` on one batch of reference images and the reference captions."""
        hp, ref, model = self.hparams, self._reference(), self.model
        if self.ref_images is None or self.ref_features is None:
            raise RuntimeError("ZSCL.setup() must run before training (it loads the reference data)")
        if not hp.ref_batch_size:
            self.ref_images.batch_size = batch_size
        rows, images = self.ref_images.next_indexed()
        images = images.to(model.device, non_blocking=True)
        e_ref = self.encode_reference_text()
        scale = ref.logit_scale()
        with torch.no_grad(), self.profiler.section("reference_forward"):
            f_ref = self.ref_features(rows, images, ref.encode_image)
        f_cur = model.encode_image(images)
        if hp.text_distill == "official":
            s_ref, s_cur = scale * f_ref @ e_ref.T, scale * f_cur @ e_ref.T
        else:
            n = len(self.captions)
            k = n if not hp.ref_text_batch or hp.ref_text_batch >= n else hp.ref_text_batch
            idx = torch.randperm(n, generator=self._caption_gen)[:k].to(e_ref.device)
            g_cur = model.encode_text(self.caption_tokens[idx])
            s_ref, s_cur = scale * f_ref @ e_ref[idx].T, scale * f_cur @ g_cur.T
        t = hp.temperature
        return distillation(s_ref, s_cur, t), distillation(s_ref.T, s_cur.T, t)

    def after_step(self, task: TaskContext, step: int) -> None:
        """Weight ensemble: add a snapshot every ``avg_freq`` steps (step 0 included) and after the last."""
        freq = self.hparams.avg_freq
        if freq and (step % freq == 0 or step == task.train_steps - 1):
            running_average(self.ensemble, self.params(), self.snapshots)
            self.snapshots += 1

    def after_task(self, task: TaskContext) -> None:
        """Load the ensemble into the model: it is evaluated and the next task starts from it. The reference
        loader's workers stop here (they serve every pass of one task), so none outlives the run."""
        if self.ref_images is not None:
            self.ref_images.close()
        if self.hparams.avg_freq and self.ensemble:
            with torch.no_grad():
                for p, avg in zip(self.params(), self.ensemble, strict=True):
                    p.copy_(avg)
        self.start, self.ensemble = [], []

    def state_bytes(self) -> dict[str, int]:
        out = {}
        if self.reference is not None:
            out["reference_model"] = sum(p.numel() * p.element_size() for p in self.reference.parameters())
        if self.ref_text is not None:
            out["reference_text"] = self.ref_text.numel() * self.ref_text.element_size()
        return out


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json and the defaults) --------
# ZSCL's training loop (src/models/finetune.py, src/args.py), shared by ZSCL and its fine-tuning baseline
ZSCL_TRAINING = {
    "train.optimizer": code("AdamW (src/models/finetune.py)"),
    "train.weight_decay": code("args.py default"),
    "train.schedule": code("linear warm-up, then cosine decay to 0 (utils.cosine_lr), per iteration"),
    "train.warmup_steps": code("args.py default"),
    "train.epochs": harness("only high enough for max_steps to end the task"),
    "train.max_steps": code("--iterations"),
    "train.batch_size": code("args.py default"),
}
RECIPES = {
    "zscl": RecipeCard(
        "ZSCL (Zheng et al., ICCV 2023), official code Thunderbeee/ZSCL mtil/scripts/ZSCL.sh",
        {"train.lr": code("ZSCL.sh; its two exceptions are lr_overrides"),
         **ZSCL_TRAINING,
         "text_distill": code("'official': the frozen reference text embeddings of all captions in both terms, "
                              "no distillation gradient into the text tower; 'paper' is a variant"),
         "temperature": code("--T"),
         "image_loss": code("--image_loss"),
         "text_loss": code("--text_loss"),
         "l2": code("--l2, to the weights at the start of the task"),
         "avg_freq": code("--we --avg_freq"),
         "label_smoothing": code("--ls"),
         "lr_overrides": code("Aircraft and MNIST in ZSCL.sh"),
         "ref_images": adapted("a folder of reference images (the code: ImageNet train); empty on the embedded "
                               "benchmark, which has its own reference set"),
         "ref_captions": adapted("a captions file (the code: Conceptual Captions validation)"),
         "ref_caption_column": harness("the captions file's column (the code's file: 'title')"),
         "ref_batch_size": code("0 = the training batch size, as the code's reference loader"),
         "ref_text_batch": assumption("captions sampled per step by the 'paper' variant only"),
         "ref_image_count": harness("size of the embedded benchmark's reference image set"),
         "ref_caption_count": harness("size of the embedded benchmark's reference caption set"),
         "ref_seed": harness("seed of the reference draws"),
         "ref_workers": harness("data-loader workers for the reference images, at most --threads; kept for every "
                                "pass (a small set is read once into memory)")}),
}
