"""The text tower's context cut (``ClipModel.encode_text``): features and gradients equal those of the full
context, on the tiny backbone and on a random-weight open_clip ViT-B-16; observers still see every position."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clbench.models.backbones import load_backbone
from clbench.models.clip import ClipModel

PROMPTS = ["a photo of a dog.", "a photo of a pink primrose, a type of flower.", "x",
           "a centered satellite photo of annual crop land."]


def full_context(model: ClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's own ``encode_text`` over every position, normalised."""
    return F.normalize(model.clip.encode_text(tokens), dim=-1)


@pytest.fixture(scope="module")
def vit_b16() -> ClipModel:
    torch.manual_seed(0)
    return load_backbone("ViT-B-16", "none")


@pytest.mark.parametrize("backbone", ["tiny", "ViT-B-16"])
def test_cut_context_gives_the_full_context_features(backbone: str, tiny_model: ClipModel, request) -> None:
    model = tiny_model if backbone == "tiny" else request.getfixturevalue("vit_b16")
    tokens = model.tokenize(PROMPTS)
    length = model.text_context_length(tokens)
    assert length is not None and length < tokens.shape[1]  # the cut is taken
    assert length == int(tokens.argmax(-1).max()) + 1
    with torch.no_grad():
        cut, full = model.encode_text(tokens), full_context(model, tokens)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)


def test_cut_context_gives_the_full_context_gradients(tiny_model: ClipModel) -> None:
    tokens = tiny_model.tokenize(PROMPTS)
    weights = [site.module.in_proj_weight for site in tiny_model.attention_sites(["text"])]
    width = tiny_model.clip.text_projection.shape[1]
    probe = torch.randn(len(PROMPTS), width, generator=torch.Generator().manual_seed(1))
    grads = []
    for encode in (tiny_model.encode_text, lambda t: full_context(tiny_model, t)):
        (encode(tokens) * probe).sum().backward()
        grads.append([w.grad.clone() for w in weights])
        tiny_model.zero_grad(set_to_none=True)
    for cut, full in zip(*grads, strict=True):
        assert float(full.norm()) > 0
        torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)


def test_observers_see_every_position(tiny_model: ClipModel) -> None:
    """Feature statistics include padding positions (KeepLoRA spec D8): no cut while an observer is attached."""
    tokens = tiny_model.tokenize(PROMPTS[:2])
    assert tiny_model.text_context_length(tokens) is not None
    seen = []
    site = tiny_model.attention_sites(["text"])[0]
    remove = site.module.add_observer(lambda kind, x: seen.append(x.shape[1]))
    try:
        assert tiny_model.text_context_length(tokens) is None
        with torch.no_grad():
            tiny_model.encode_text(tokens)
    finally:
        remove()
    assert seen == [tokens.shape[1], tokens.shape[1]]  # the q/k/v input and the o input, full context


def test_no_cut_when_a_prompt_fills_the_context(tiny_model: ClipModel) -> None:
    tokens = tiny_model.tokenize([" ".join(["word"] * 40)])
    assert int(tokens.argmax(-1)) == tokens.shape[1] - 1
    assert tiny_model.text_context_length(tokens) is None
