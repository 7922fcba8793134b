"""Methods of the MCIT setting (LLaVA): MCITlib's LoRA-FT and KeepLoRA's LLaVA variant, in one registry.

The names are those of the CLIP registry (``lora``, ``keeplora``), so ``clbench run --methods lora,keeplora``
means the same method family on either setting. A CLIP method without an LLaVA form is refused in one line by
:func:`get_mcit_method`.

Hooks, called by :mod:`clbench.settings.mcit.loop`, are the shared contract's (:mod:`clbench.methods.contract`):
``setup()`` once, ``before_task(ctx)``, ``trainable_parameters()`` for AdamW, ``after_task(ctx)``; ``state_dict()`` /
``check_state()`` / ``load_state_dict()`` for resume, ``state_bytes()`` by name; the typed hyperparameters are
``self.hparams``. Costly steps are timed in ``self.profiler`` sections named as for CLIP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from clbench import linalg
from clbench.costs.profiler import Profiler
from clbench.methods.contract import MethodContract
from clbench.methods.registry import Registry
from clbench.methods.state_checks import StateMismatch, tensor_entry
from clbench.models.attention import LowRankDelta
from clbench.settings.mcit.backbone import adapted_linears, projector_parameters


class LoRALinear(nn.Module):
    """``y = W x + b + s · B (A dropout(x))``: an ``nn.Linear`` with one low-rank adapter.

    The adapter is the CLIP setting's :class:`~clbench.models.attention.LowRankDelta` (one LoRA layer for both
    settings): ``A`` is its ``down`` (``r × d_in``), ``B`` its ``up`` (``d_out × r``), PyTorch layout. A frozen
    ``A`` is a buffer, not a parameter (KeepLoRA, LoRA-FA style).
    """

    def __init__(self, base: nn.Linear, A: Tensor, B: Tensor, scale: float, dropout: float, train_A: bool):
        super().__init__()
        self.base = base
        self.delta = LowRankDelta(A, B, scale, train_down=train_A, train_up=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def A(self) -> Tensor:
        return self.delta.down

    @property
    def B(self) -> Tensor:
        return self.delta.up

    @property
    def scale(self) -> float:
        return self.delta.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.delta(self.dropout(x))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with ``s · B A`` added to its weight (the product in the factors' dtype whatever the
        caller's autocast)."""
        self.base.weight += self.delta.delta().to(self.base.weight.dtype)
        return self.base


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@dataclass
class McitContext:
    """What a method may know about the current task; ``batches`` yields model-ready training batches."""

    index: int
    name: str
    num_tasks: int
    device: torch.device
    batches: Callable[..., Iterator[dict[str, Tensor]]]  # (fraction, batch_size, evenly_spaced) -> batches


class McitMethod(MethodContract):
    """Base of the LLaVA setting's methods (the shared :class:`~clbench.methods.contract.MethodContract`): trains
    the projector only at ``projector_lr``; subclasses add adapters. ``generator`` draws the method's random
    numbers (adapter inits, sketches) and is part of its resumable state."""

    def __init__(self, model: nn.Module, hparams, profiler: Profiler, generator: torch.Generator):
        super().__init__(model, hparams, profiler)
        self.generator = generator
        self.layers: dict[str, LoRALinear] = {}

    def before_task(self, ctx: McitContext) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> list[dict]:
        """Adapter factors at ``lr``, the projector at ``projector_lr`` (MCITlib's ``--mm_projector_lr``)."""
        adapters = [p for layer in self.layers.values() for p in layer.delta.parameters()]
        return [{"params": adapters, "lr": self.hparams.lr},
                {"params": projector_parameters(self.model), "lr": self.hparams.projector_lr}]

    def freeze_all_but_trained(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for group in self.trainable_parameters():
            for p in group["params"]:
                p.requires_grad_(True)

    def attach(self, factors: dict[str, tuple[Tensor, Tensor]], scale: float, dropout: float, train_A: bool) -> None:
        for name, linear in adapted_linears(self.model).items():
            A, B = factors[name]
            self.layers[name] = LoRALinear(linear, A, B, scale, dropout, train_A)
            _swap(self.model, name, self.layers[name])
        self.freeze_all_but_trained()

    def merge(self) -> None:
        """Fold every adapter into its base weight and remove it (a full checkpoint per task, as MCITlib)."""
        with self.profiler.section("merge"):
            for name, layer in self.layers.items():
                _swap(self.model, name, layer.merged())
            self.layers = {}

    def after_task(self, ctx: McitContext) -> None:
        self.merge()

    def state_dict(self) -> dict[str, Tensor]:
        """What the method keeps between tasks (its adapters are merged after every task): its generator's state
        and, in subclasses, their memories. Saved in resume checkpoints."""
        return {"generator": self.generator.get_state()}

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[str]) -> None:
        """Refuse restored state that does not fit this method on this model (before it is loaded), with a
        :class:`~clbench.methods.state_checks.StateMismatch` naming the entry (the CLIP contract's hook): here the
        generator's state, and in subclasses their memories."""
        unknown = sorted(k for k in state if k != "generator" and not self._owns(k))
        if unknown:
            raise StateMismatch(tensor_entry(unknown[0]), "is not state of this method")
        generator = state.get("generator")
        size = torch.Generator().get_state().numel()
        if generator is None or generator.dim() != 1 or generator.numel() != size:
            raise StateMismatch(tensor_entry("generator"), f"must be a generator state of {size} bytes")

    def _owns(self, key: str) -> bool:
        """Whether ``key`` (beyond the generator) names state a subclass keeps."""
        return False

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict`; a state of another method raises ``KeyError`` / ``ValueError``."""
        extra = sorted(set(state) - {"generator"})
        if extra:
            raise KeyError(f"unexpected entries {extra[:3]}")
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())


def _refusal(name: str, available: list[str]) -> str:
    from clbench.methods.registry import CLIP_METHODS

    listed = f"available there: {', '.join(available)} (see 'clbench methods')"
    if name in CLIP_METHODS:
        return f"method {name!r} has no LLaVA form and cannot run on the MCIT setting; {listed}"
    return f"unknown method {name!r} on the MCIT setting (LLaVA); {listed}"


MCIT_METHODS: Registry[type[McitMethod]] = Registry(_refusal)


def register_mcit(name: str):
    """Class decorator registering an MCIT method under ``name``."""
    return MCIT_METHODS.register(name)


def list_mcit_methods() -> list[str]:
    return MCIT_METHODS.names()


def get_mcit_method(name: str) -> type[McitMethod]:
    """The MCIT class of ``name``; a CLIP-only method (or an unknown name) is refused in one line."""
    return MCIT_METHODS.get(name)


# Ranges of the hyperparameters (checked by every --set, clbench.config.set_field; the CLIP forms' own ranges)
RANK = {"min": 1}
POSITIVE = {"min": 0.0, "exclusive_min": True}
NON_NEGATIVE = {"min": 0.0}
SHARE = {"min": 0.0, "max": 1.0}
FRACTION = {"min": 0.0, "exclusive_min": True, "max": 1.0}


@dataclass
class LoraFTHparams:
    """MCITlib LoRA-FT: r (UCIT 16, DCL 32), alpha = 2r, dropout 0.05; lr 2e-4 and projector 2e-5 there."""

    rank: int = field(default=8, metadata=RANK)
    alpha: float = field(default=16.0, metadata=POSITIVE)
    dropout: float = field(default=0.05, metadata=SHARE)
    lr: float = field(default=5e-3, metadata=POSITIVE)
    projector_lr: float = field(default=5e-4, metadata=NON_NEGATIVE)


@register_mcit("lora")
class LoraFT(McitMethod):
    """LoRA-FT (MCITlib): a fresh LoRA on every linear of the language model per task, merged after the task."""

    summary = "MCITlib LoRA-FT: LoRA on every LLM linear (r, alpha = 2r), projector at its own rate, merged per task"
    Hparams = LoraFTHparams

    def before_task(self, ctx: McitContext) -> None:
        factors = {}
        for name, linear in adapted_linears(self.model).items():
            A = torch.empty(self.hparams.rank, linear.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=self.generator)  # PEFT's default A init
            factors[name] = (A, torch.zeros(linear.out_features, self.hparams.rank))
        self.attach(factors, self.hparams.alpha / self.hparams.rank, self.hparams.dropout, train_A=True)


@dataclass
class KeepLoraLlavaHparams:
    """KeepLoRA's LLaVA variant: r (UCIT 32, DCL 64), alpha = r/4, eps_w 0.6, memory energy 0.99, 20% of data."""

    rank: int = field(default=8, metadata=RANK)
    alpha: float = field(default=2.0, metadata=POSITIVE)
    dropout: float = field(default=0.05, metadata=SHARE)
    lr: float = field(default=5e-3, metadata=POSITIVE)
    projector_lr: float = field(default=5e-4, metadata=NON_NEGATIVE)
    eps_w: float = field(default=0.6, metadata=SHARE)
    energy: float = field(default=0.99, metadata=FRACTION)
    grad_fraction: float = field(default=0.2, metadata=FRACTION)
    svd_niter: int = field(default=2, metadata={"min": 0})


@register_mcit("keeplora")
class KeepLoraLlava(McitMethod):
    """KeepLoRA, LLaVA form (Luo et al., ICLR 2026, arXiv 2601.19659, its LLaVA-1.5 experiments; run through MCITlib
    as ``KeepLoRA``).

    Per adapted weight W (PyTorch ``d_out × d_in``), with ``U`` = [W_p, M] the stored input-side basis:
    - setup: ``W_p`` = top right singular vectors of W with energy ``eps_w`` (paper rule, input side);
    - before task t: G = mean gradient of the loss over ``grad_fraction`` of the task's items (``int(N·f)``
      items at ``linspace(0, N − 1, int(N·f))``, batch 1, as the official ``extract_gradients.py``);
      Ĝ = (I − U Uᵀ) Gᵀ; A = U_rᵀ from the official sketch of Ĝ, ``torch.svd_lowrank(Ĝ, q=r)`` (r sketch
      columns, torch's default 2 power iterations; drawn from the method's generator), frozen; B = 0;
      no weight shift; s = alpha / r;
    - after task t: merge; G' = the post-training gradient of the merged model on the same share;
      M grows by the GPM rule at ``energy`` on Ĝ' (its input-side column space stands in for the features).
    """

    summary = "KeepLoRA (LLaVA form): frozen A from the projected gradient, B = 0, gradient memory at 0.99"
    Hparams = KeepLoraLlavaHparams

    def setup(self) -> None:
        self.basis: dict[str, Tensor] = {}
        with self.profiler.section("pretrained_svd"):
            for name, linear in adapted_linears(self.model).items():
                self.basis[name] = linalg.principal_basis(linear.weight, self.hparams.eps_w, side="input", rule="paper")

    def _gradients(self, ctx: McitContext) -> dict[str, Tensor]:
        """Mean loss gradient of every adapted weight over the first-pass share of the task (paper layout)."""
        linears = adapted_linears(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for linear in linears.values():
            linear.weight.requires_grad_(True)
            linear.weight.grad = None
        n = 0
        was_training = self.model.training
        self.model.train()
        for batch in ctx.batches(fraction=self.hparams.grad_fraction, batch_size=1, evenly_spaced=True):
            self.model(**batch).loss.backward()
            n += 1
        self.model.train(was_training)
        grads = {}
        for name, linear in linears.items():
            grads[name] = (linear.weight.grad / max(n, 1)).T.float()  # d_in x d_out
            linear.weight.grad = None
            linear.weight.requires_grad_(False)
        return grads

    def before_task(self, ctx: McitContext) -> None:
        with self.profiler.section("grad_estimation"):
            grads = self._gradients(ctx)
        factors = {}
        with self.profiler.section("grad_svd"):
            for name, G in grads.items():
                U = self.basis[name]
                G_hat = linalg.project_out(G, U)
                A, _, _ = linalg.top_r_factors(G_hat, self.hparams.rank, method="randomized",
                                               oversample=self.hparams.rank, niter=self.hparams.svd_niter,
                                               generator=self.generator, basis=U)
                d_out = G.shape[1]
                factors[name] = (A.T.contiguous(), torch.zeros(d_out, A.shape[1]))
        self.attach(factors, self.hparams.alpha / self.hparams.rank, self.hparams.dropout, train_A=False)

    def after_task(self, ctx: McitContext) -> None:
        self.merge()
        with self.profiler.section("feature_stats"):
            grads = self._gradients(ctx)
        with self.profiler.section("feature_svd"):
            for name, G in grads.items():
                self.basis[name] = linalg.gpm_extend(self.basis[name], self.hparams.energy, features=G)
        self.profiler.record_state(ctx.index, "basis", self.state_bytes()["basis"],
                                   columns=sum(b.shape[1] for b in self.basis.values()))

    def state_bytes(self) -> dict[str, int]:
        return {"basis": sum(b.numel() * b.element_size() for b in getattr(self, "basis", {}).values())}

    def _owns(self, key: str) -> bool:
        return key.startswith("basis/")

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: list[str]) -> None:
        """Also: one finite input-side basis (``d_in`` rows, at most ``d_in`` columns) per adapted layer."""
        super().check_state(state, extra, tasks)
        linears = adapted_linears(self.model)
        for name, linear in linears.items():
            U = state.get(f"basis/{name}")
            if U is None:
                raise StateMismatch(tensor_entry(f"basis/{name}"), "is missing")
            if U.dim() != 2 or U.shape[0] != linear.in_features or U.shape[1] > linear.in_features:
                raise StateMismatch(tensor_entry(f"basis/{name}"), f"must be {linear.in_features} x k (k <= "
                                    f"{linear.in_features}), not {tuple(U.shape)}")
            if not U.is_floating_point() or not bool(torch.isfinite(U).all()):
                raise StateMismatch(tensor_entry(f"basis/{name}"), "must hold finite floating-point values")
        unknown = sorted(k for k in state if k.startswith("basis/") and k.removeprefix("basis/") not in linears)
        if unknown:
            raise StateMismatch(tensor_entry(unknown[0]), "names no adapted layer of this model")

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), **{f"basis/{name}": U for name, U in self.basis.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        basis = {k.removeprefix("basis/"): v for k, v in state.items() if k.startswith("basis/")}
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("basis/")})
        for name, linear in adapted_linears(self.model).items():
            U = basis.get(name)
            if U is None or U.dim() != 2 or U.shape[0] != linear.in_features:
                raise ValueError(f"no basis of {linear.in_features} rows for {name}")
        if set(basis) != set(adapted_linears(self.model)):
            raise KeyError(f"bases of unknown layers {sorted(set(basis) - set(adapted_linears(self.model)))[:3]}")
        self.basis = {k: v.float() for k, v in basis.items()}
