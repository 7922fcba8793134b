"""LoRA-capable multi-head attention with open_clip's parameter names.

open_clip's blocks use ``nn.MultiheadAttention``, which keeps q/k/v packed in ``in_proj_weight`` and never
calls ``out_proj.forward``, so neither low-rank deltas on single projections nor the input of the output
projection are reachable from outside. :class:`LoRAAttention` keeps the same parameter names
(``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``) so pretrained state dicts
load unchanged, and computes q, k, v, o explicitly with ``F.scaled_dot_product_attention``.

Each projection (``q``, ``k``, ``v``, ``o``) can carry any number of named :class:`LowRankDelta` adapters,
whose factors are trainable parameters or frozen buffers. Observers registered with
:meth:`LoRAAttention.add_observer` receive the inputs of the q/k/v projections (``"qkv"``) and of the
output projection (``"o"``) on every forward, which is how feature statistics are collected.

A *residual key/value branch* (:meth:`LoRAAttention.set_residual_kv`, DIKI's fully residual attention) adds
``w · softmax(q K_pᵀ/√d_h) V_p`` to the attended values before the output projection: the queries attend to
extra key/value tokens in a separate softmax, so the pretrained branch ``softmax(q Kᵀ/√d_h) V`` is untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.linalg import full_precision

PROJECTIONS = ("q", "k", "v", "o")
Observer = Callable[[str, Tensor], None]
# (keys [N or 1, P, d], values [N or 1, P, d], weight [N] or None) of a residual key/value branch, or None (off)
ResidualKV = tuple[Tensor, Tensor, "Tensor | None"]
ResidualKVProvider = Callable[[int], "ResidualKV | None"]


class LowRankDelta(nn.Module):
    """A low-rank weight delta ``ΔW = scale · up @ down`` (PyTorch layout, ``d_out × d_in``).

    ``down`` (r × d_in) and ``up`` (d_out × r) are each either a trainable ``nn.Parameter`` or a frozen
    buffer. In KeepLoRA's notation A = downᵀ and B = upᵀ; in InfLoRA's, D = down and U = up.
    """

    def __init__(
        self, down: Tensor, up: Tensor, scale: float = 1.0, train_down: bool = False, train_up: bool = True
    ) -> None:
        super().__init__()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"incompatible factors: down {tuple(down.shape)}, up {tuple(up.shape)}")
        self.scale = float(scale)
        for name, value, trainable in (("down", down, train_down), ("up", up, train_up)):
            value = value.detach().clone()
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> Tensor:
        """The dense weight delta, ``d_out × d_in``, in the factors' dtype whatever the caller's autocast (a
        half-precision product would add rounding outside the factors' spans, e.g. when merging)."""
        with full_precision():
            return self.scale * (self.up @ self.down)

    def forward(self, x: Tensor) -> Tensor:
        # the factors in the input's dtype (a no-op in fp32 and under autocast; LLaVA's half-precision linears)
        return self.scale * F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


class LoRAAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` (self-attention, batch-first) with adapters."""

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.adapters = nn.ModuleDict({p: nn.ModuleDict() for p in PROJECTIONS})
        self._observers: list[Observer] = []
        self._residual_kv: ResidualKVProvider | None = None
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> LoRAAttention:
        """Build from an existing ``nn.MultiheadAttention``, copying its weights exactly."""
        if not mha._qkv_same_embed_dim:
            raise ValueError("only self-attention with packed q/k/v weights is supported")
        new = cls(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    # ---- weights of single projections -------------------------------------------------------
    def projection_weight(self, proj: str) -> Tensor:
        """The base weight of one projection (a view into the packed weight for q/k/v), ``d × d``."""
        d = self.embed_dim
        if proj == "o":
            return self.out_proj.weight
        index = "qkv".index(proj)
        return self.in_proj_weight[index * d : (index + 1) * d]

    def add_to_weight(self, proj: str, delta: Tensor) -> None:
        """Add ``delta`` (``d × d``) into the base weight of ``proj`` in place (no autograd)."""
        with torch.no_grad():
            self.projection_weight(proj).add_(delta.to(self.in_proj_weight.dtype))

    # ---- adapters ------------------------------------------------------------------------------
    def add_adapter(self, proj: str, name: str, delta: LowRankDelta) -> None:
        if proj not in PROJECTIONS:
            raise ValueError(f"unknown projection {proj!r}; expected one of {PROJECTIONS}")
        if delta.up.shape[0] != self.embed_dim or delta.down.shape[1] != self.embed_dim:
            raise ValueError(f"adapter shape does not fit a {self.embed_dim}-wide projection")
        self.adapters[proj][name] = delta.to(self.in_proj_weight.device)

    def remove_adapter(self, proj: str, name: str) -> LowRankDelta:
        adapter = self.adapters[proj][name]
        del self.adapters[proj][name]
        return adapter

    def merge_adapter(self, proj: str, name: str) -> None:
        """Fold an adapter's delta into the base weight and remove it; the forward is unchanged."""
        adapter = self.remove_adapter(proj, name)
        self.add_to_weight(proj, adapter.delta().detach())

    def clear_adapters(self) -> None:
        for proj in PROJECTIONS:
            self.adapters[proj].clear()

    # ---- observers -----------------------------------------------------------------------------
    def add_observer(self, fn: Observer) -> Callable[[], None]:
        """Call ``fn(kind, x)`` on every forward, kind ``"qkv"`` or ``"o"``; returns a remover."""
        self._observers.append(fn)
        return lambda: self._observers.remove(fn) if fn in self._observers else None

    def _observe(self, kind: str, x: Tensor) -> None:
        for fn in self._observers:
            fn(kind, x)

    # ---- residual key/value branch ---------------------------------------------------------------------
    def set_residual_kv(self, provider: ResidualKVProvider | None) -> None:
        """Install (or, with None, remove) a residual key/value branch. ``provider(n)`` is called on every forward
        of a batch of ``n`` sequences and returns ``(keys, values, weight)`` or None (branch off for this call):
        keys/values ``[n or 1, P, d]`` in the projected key/value space (not passed through ``in_proj``), split
        into heads like k and v; ``weight`` ``[n]`` scales the branch per sequence (None: 1). No attention mask
        applies to the branch (every position sees every extra token, as in DIKI's code)."""
        self._residual_kv = provider

    def _residual(self, q: Tensor, n: int) -> Tensor | None:
        """``w · softmax(q K_pᵀ/√d_h) V_p`` for head-split queries ``q`` ``[n, h, L, d_h]``, or None."""
        extra = self._residual_kv(n) if self._residual_kv is not None else None
        if extra is None:
            return None
        keys, values, weight = extra
        h, dh = self.num_heads, self.embed_dim // self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.expand(n, -1, -1).reshape(n, t.shape[-2], h, dh).transpose(1, 2).to(q.dtype)

        out = F.scaled_dot_product_attention(q, heads(keys), heads(values))
        return out if weight is None else out * weight.to(out.dtype).view(n, 1, 1, 1)

    def _project(self, proj: str, x: Tensor, base: Tensor) -> Tensor:
        for adapter in self.adapters[proj].values():
            base = base + adapter(x)
        return base

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("LoRAAttention supports self-attention only")
        if need_weights:
            raise NotImplementedError("LoRAAttention does not return attention weights")
        x = query if self.batch_first else query.transpose(0, 1)  # [N, L, d]
        n, length, d = x.shape
        self._observe("qkv", x)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (self._project(p, x, t) for p, t in zip("qkv", qkv.chunk(3, dim=-1), strict=True))
        h = self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(n, length, h, d // h).transpose(1, 2)

        mask = _merge_masks(attn_mask, key_padding_mask, x.dtype)
        q = heads(q)
        attended = F.scaled_dot_product_attention(q, heads(k), heads(v), attn_mask=mask)
        residual = self._residual(q, n)
        if residual is not None:
            attended = attended + residual
        attended = attended.transpose(1, 2).reshape(n, length, d)
        self._observe("o", attended)
        out = self._project("o", attended, F.linear(attended, self.out_proj.weight, self.out_proj.bias))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _merge_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Turn MHA-style masks (bool = masked out, or additive float) into one additive SDPA mask."""
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, dtype)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def replace_attention(module: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` below ``module`` by :class:`LoRAAttention`; returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, LoRAAttention.from_mha(child))
            count += 1
        else:
            count += replace_attention(child)
    return count
