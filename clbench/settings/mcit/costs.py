"""Cost of KeepLoRA's LLaVA form at the shapes of a real LLaVA, on random weights (no checkpoint, no data).

``clbench profile --backbone llava-1.5-7b`` builds ``--layers`` decoder layers (and as many vision-tower layers)
at the real shapes (LLaVA-1.5-7B: Vicuna-7B, hidden 4096, MLP 11008, 32 heads, 32 layers, vocabulary 32064;
CLIP ViT-L/14-336 tower, hidden 1024, MLP 4096, 16 heads, 24 layers, 576 image tokens; ``mlp2x_gelu`` projector
1024 -> 4096 -> 4096), then measures:

- ``grad_estimation`` per training item (batch 1, as KeepLoRA's gradient pass): the vision tower's forward, the
  projector's forward, forward + backward of the decoder layers with a gradient on every adapted weight, and the
  ``lm_head`` with the loss, on 576 image tokens + ``TEXT_TOKENS`` text tokens. The decoder and vision times are
  per built layer and **extrapolated** to the model's layer counts (the output says so). ``feature_stats`` (the
  post-training gradient) is the same pass.
- ``pretrained_svd`` (W_p at eps_w), ``grad_svd`` (projection and rank-r randomized SVD of the gradient) and
  ``feature_svd`` (GPM extension of the memory from the gradient) on one built matrix of each shape (q/k/v/o,
  gate/up, down) with the gradient of the backward pass, times the number of such matrices in the model. A shape
  whose input width exceeds ``svd_max_dim`` is not measured: its time is extrapolated from the widest measured
  shape by the cube of the input width (the eigendecompositions of ``d_in x d_in`` matrices dominate), and
  marked so. Random weights have a flatter spectrum than trained ones, so W_p is wider (an upper bound).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from clbench import linalg
from clbench.errors import UserError

TEXT_TOKENS = 64  # question + answer tokens beside the image tokens (UCIT items are short)


@dataclass(frozen=True)
class LlavaShape:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    vision_layers: int
    image: int
    patch: int

    @property
    def image_tokens(self) -> int:
        return (self.image // self.patch) ** 2


# llava-hf config.json of LLaVA-1.5 (Vicuna text model, CLIP ViT-L/14-336 tower); llava-tiny = clbench's tiny LLaVA
SHAPES = {
    "llava-1.5-7b": LlavaShape(4096, 11008, 32, 32, 32064, 1024, 4096, 16, 24, 336, 14),
    "llava-1.5-13b": LlavaShape(5120, 13824, 40, 40, 32064, 1024, 4096, 16, 24, 336, 14),
    "llava-tiny": LlavaShape(64, 128, 4, 2, 128, 64, 128, 4, 2, 32, 8),
}


@dataclass
class PartCost:
    """Seconds of one measured part, ``count`` times in the model (or per task); ``how`` says how it was got."""

    section: str
    part: str
    d_out: int
    d_in: int
    count: int
    seconds: float  # one unit (one layer, one matrix, one pass)
    how: str
    basis_columns: int = 0

    @property
    def total(self) -> float:
        return self.seconds * self.count


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn) -> tuple[float, object]:
    """Wall seconds of ``fn()`` (CUDA synchronised before and after) and its result."""
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def _transformers():
    from clbench.settings.mcit.backbone import _transformers as tf

    return tf()


def gradient_pass(shape: LlavaShape, layers: int, seed: int, device: str) -> tuple[list[PartCost], nn.Module]:
    """Per-item cost of the gradient pass, and the built decoder (its first layer holds weights and gradients)."""
    tf = _transformers()
    torch.manual_seed(seed)
    seq = shape.image_tokens + TEXT_TOKENS
    nv = min(layers, shape.vision_layers)
    vision = tf.CLIPVisionModel(tf.CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate, num_hidden_layers=nv,
        num_attention_heads=shape.vision_heads, image_size=shape.image, patch_size=shape.patch)).to(device).eval()
    pixels = torch.randn(1, 3, shape.image, shape.image, device=device)
    with torch.no_grad():
        t_vision, _ = _timed(lambda: vision(pixel_values=pixels, output_hidden_states=True))
    projector = nn.Sequential(nn.Linear(shape.vision_hidden, shape.hidden), nn.GELU(),
                              nn.Linear(shape.hidden, shape.hidden)).to(device)
    feats = torch.randn(1, shape.image_tokens, shape.vision_hidden, device=device)
    with torch.no_grad():
        t_proj, _ = _timed(lambda: projector(feats))
    vision = projector = None  # free them before the decoder is built
    decoder = tf.LlamaModel(tf.LlamaConfig(
        vocab_size=2, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, max_position_embeddings=seq,
        bos_token_id=0, eos_token_id=1, pad_token_id=None)).to(device)
    for name, p in decoder.named_parameters():
        p.requires_grad_(name.endswith("proj.weight"))  # the adapted linears: q, k, v, o, gate, up, down
    head = nn.Linear(shape.hidden, shape.vocab, bias=False).to(device).requires_grad_(False)
    x = torch.randn(1, seq, shape.hidden, device=device) * 0.02
    labels = torch.randint(0, shape.vocab, (seq,), device=device)

    def step(hidden_fn):
        loss = nn.functional.cross_entropy(head(hidden_fn()).view(seq, -1), labels)
        loss.backward()

    t_total, _ = _timed(lambda: step(lambda: decoder(inputs_embeds=x).last_hidden_state))
    h = torch.randn(1, seq, shape.hidden, device=device, requires_grad=True)
    t_head, _ = _timed(lambda: step(lambda: h))
    per_layer = max(t_total - t_head, 0.0) / layers
    parts = [
        PartCost("grad_estimation", "vision layer, fwd", shape.vision_hidden, shape.vision_hidden,
                 shape.vision_layers, t_vision / nv, f"{nv} built, x{shape.vision_layers}"),
        PartCost("grad_estimation", "projector, fwd", shape.hidden, shape.vision_hidden, 1, t_proj, "measured"),
        PartCost("grad_estimation", "decoder layer, fwd+bwd", shape.hidden, shape.hidden, shape.layers,
                 per_layer, f"{layers} built, x{shape.layers}"),
        PartCost("grad_estimation", "lm_head+loss, fwd+bwd", shape.vocab, shape.hidden, 1, t_head, "measured"),
    ]
    return parts, decoder


def svd_sections(decoder: nn.Module, shape: LlavaShape, rank: int, eps_w: float, energy: float, seed: int,
                 svd_max_dim: int) -> list[PartCost]:
    """The three SVD sections on one built matrix of each shape, with its gradient from the backward pass."""
    layer = decoder.layers[0]
    kinds = [("q/k/v/o", layer.self_attn.q_proj, 4), ("gate/up", layer.mlp.gate_proj, 2),
             ("down", layer.mlp.down_proj, 1)]
    gen = torch.Generator().manual_seed(seed)
    out: list[PartCost] = []
    measured: dict[str, tuple[int, int, dict[str, float]]] = {}
    for kind, linear, per_layer in kinds:
        W, G = linear.weight.detach(), linear.weight.grad.detach().T.float()  # G: paper layout d_in x d_out
        count = per_layer * shape.layers
        d_out, d_in = W.shape
        if d_in > svd_max_dim:
            ref_kind = max(measured, key=lambda k: measured[k][:2])  # the widest measured (d_in, then d_out)
            ref_d, _, ref_times = measured[ref_kind]
            factor = (d_in / ref_d) ** 3
            for section, seconds in ref_times.items():
                out.append(PartCost(section, kind, d_out, d_in, count, seconds * factor,
                                    f"EXTRAPOLATED: {ref_kind} x ({d_in}/{ref_d})^3"))
            continue
        t_p, U = _timed(lambda W=W: linalg.principal_basis(W, eps_w, side="input", rule="paper", method="auto"))
        t_g, _ = _timed(lambda G=G, U=U: linalg.top_r_factors(linalg.project_out(G, U), rank, method="randomized",
                                                               niter=2, generator=gen, basis=U))
        t_f, U2 = _timed(lambda G=G, U=U: linalg.gpm_extend(U, energy, features=G))
        times = {"pretrained_svd": t_p, "grad_svd": t_g, "feature_svd": t_f}
        measured[kind] = (d_in, d_out, times)
        for section, seconds in times.items():
            out.append(PartCost(section, kind, d_out, d_in, count, seconds, f"1 built, x{count}",
                                U2.shape[1] if section == "feature_svd" else U.shape[1]))
    return out


def profile_llava(backbone: str, layers: int = 1, rank: int = 32, eps_w: float = 0.6, energy: float = 0.99,
                  seed: int = 0, device: str = "cpu", svd_max_dim: int = 4096) -> list[PartCost]:
    """Every measured part of KeepLoRA's LLaVA-form costs at ``backbone``'s shapes (see the module docstring)."""
    if backbone not in SHAPES:
        raise UserError(f"--backbone {backbone!r}: LLaVA shapes known are {', '.join(SHAPES)}")
    shape = SHAPES[backbone]
    if not 1 <= layers <= shape.layers:
        raise UserError(f"--layers {layers}: build between 1 and {shape.layers} decoder layers of {backbone}")
    if svd_max_dim < min(shape.hidden, shape.intermediate):
        raise UserError(f"--svd-max-dim {svd_max_dim}: at least the hidden width {shape.hidden} of {backbone}, so "
                        "one shape is measured")
    parts, decoder = gradient_pass(shape, layers, seed, device)
    return parts + svd_sections(decoder, shape, rank, eps_w, energy, seed, svd_max_dim)
