"""LoRAAttention: same outputs as nn.MultiheadAttention, exact merges, true projection inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clbench.models.attention import LoRAAttention, LowRankDelta


def _mha(d: int = 32, heads: int = 4) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(d, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha


@pytest.mark.parametrize("causal", [False, True])
def test_matches_multihead_attention(causal: bool) -> None:
    mha = _mha()
    attn = LoRAAttention.from_mha(mha)
    x = torch.randn(3, 9, 32)
    mask = torch.full((9, 9), float("-inf")).triu(1) if causal else None
    expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    got = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_state_dict_names_match_mha() -> None:
    mha = _mha()
    attn = LoRAAttention.from_mha(mha)
    assert set(attn.state_dict()) == set(mha.state_dict())
    fresh = LoRAAttention(32, 4)
    fresh.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.allclose(fresh(x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-5)


def _random_delta(d: int, r: int, scale: float, seed: int, train_down: bool = False) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(r, d, generator=g), torch.randn(d, r, generator=g), scale, train_down=train_down)


@pytest.mark.parametrize("proj", ["q", "k", "v", "o"])
def test_adapter_changes_only_its_projection_and_merges_exactly(proj: str) -> None:
    attn = LoRAAttention.from_mha(_mha())
    x = torch.randn(2, 6, 32)
    before = attn(x)[0]
    attn.add_adapter(proj, "t", _random_delta(32, 4, 0.1, seed=1))
    adapted = attn(x)[0]
    assert not torch.allclose(adapted, before, atol=1e-4)
    attn.merge_adapter(proj, "t")
    assert len(attn.adapters[proj]) == 0
    assert torch.allclose(attn(x)[0], adapted, atol=1e-5)


def test_adapter_equals_dense_weight_delta() -> None:
    attn = LoRAAttention.from_mha(_mha())
    reference = LoRAAttention.from_mha(_mha())
    delta = _random_delta(32, 3, 0.5, seed=2)
    attn.add_adapter("v", "t", delta)
    reference.add_to_weight("v", delta.delta())
    x = torch.randn(2, 6, 32)
    assert torch.allclose(attn(x)[0], reference(x)[0], atol=1e-5)


def test_subtract_then_add_is_identity() -> None:
    attn = LoRAAttention.from_mha(_mha())
    original = attn.in_proj_weight.detach().clone()
    delta = _random_delta(32, 4, 0.25, seed=3).delta()
    attn.add_to_weight("k", -delta)
    attn.add_to_weight("k", delta)
    assert torch.allclose(attn.in_proj_weight, original, atol=1e-6)


def test_frozen_and_trainable_factors() -> None:
    frozen = _random_delta(32, 4, 1.0, seed=4)
    assert [n for n, _ in frozen.named_parameters()] == ["up"]
    assert "down" in dict(frozen.named_buffers())
    both = _random_delta(32, 4, 1.0, seed=4, train_down=True)
    assert {n for n, _ in both.named_parameters()} == {"down", "up"}


def test_observers_see_true_projection_inputs() -> None:
    mha = _mha()
    attn = LoRAAttention.from_mha(mha)
    seen: dict[str, torch.Tensor] = {}
    remove = attn.add_observer(lambda kind, t: seen.__setitem__(kind, t.detach().clone()))
    x = torch.randn(2, 7, 32)
    out = attn(x)[0]
    assert torch.equal(seen["qkv"], x)
    # the o-input times out_proj must reproduce the output exactly
    assert torch.allclose(attn.out_proj(seen["o"]), out, atol=1e-5)
    # and it must equal softmax(qk^T/sqrt(dh)) v computed by hand
    d, h = 32, 4
    q, k, v = nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    split = lambda t: t.view(2, 7, h, d // h).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (d // h) ** 0.5, -1)
    manual = (weights @ split(v)).transpose(1, 2).reshape(2, 7, d)
    assert torch.allclose(seen["o"], manual, atol=1e-5)
    remove()
    seen.clear()
    attn(x)
    assert not seen


def test_whole_backbone_uses_lora_attention(tiny_model) -> None:
    sites = tiny_model.attention_sites()
    assert len(sites) == 8 and all(isinstance(s.module, LoRAAttention) for s in sites)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in tiny_model.modules())
