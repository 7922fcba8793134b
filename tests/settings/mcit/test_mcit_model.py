"""Tiny LLaVA, llava-hf loading, the codec, and the lora / keeplora LLaVA methods through their hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="the MCIT setting needs transformers (pip install 'clbench[mcit]')")

from clbench import linalg  # noqa: E402
from clbench.costs.profiler import Profiler  # noqa: E402
from clbench.errors import UserError  # noqa: E402
from clbench.settings.mcit import synthetic  # noqa: E402
from clbench.settings.mcit.backbone import adapted_linears, load_llava_checkpoint, projector_parameters, tiny_llava  # noqa: E402
from clbench.settings.mcit.bench import synthetic_tasks  # noqa: E402
from clbench.settings.mcit.codec import Codec, tiny_processor  # noqa: E402
from clbench.settings.mcit.loop import LoopConfig, _context, train_task  # noqa: E402
from clbench.settings.mcit.methods import KeepLoraLlava, LoraFT, LoRALinear, get_mcit_method  # noqa: E402


@pytest.fixture
def tiny():
    processor = tiny_processor([*synthetic.vocabulary(), "say"])
    model = tiny_llava(len(processor.tokenizer), processor.tokenizer.convert_tokens_to_ids("<image>"), seed=0)
    return model.eval(), Codec(processor)


def _batch(codec, task="shape-qa", n=4):
    s = synthetic.make_split(task, n, 5)
    return codec.train_batch(s.questions, s.answers, s.images)


def test_adapted_layers_found_by_pattern(tiny):
    model, _ = tiny
    names = adapted_linears(model)
    assert len(names) == 7 * 2
    assert {n.split(".")[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}
    assert not any("vision" in n or "projector" in n or "lm_head" in n for n in names)
    assert projector_parameters(model)

    # the pre-4.52 layout (language_model.model.layers, mm_projector) is matched by the same rule
    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = nn.Sequential(nn.Linear(2, 2))
            self.mm_projector = nn.Sequential(nn.Linear(2, 2))
            self.language_model = nn.Module()
            self.language_model.model = nn.Module()
            self.language_model.model.q_proj = nn.Linear(2, 2)
            self.language_model.lm_head = nn.Linear(2, 2)

    assert list(adapted_linears(Old())) == ["language_model.model.q_proj"]


def test_codec_labels_cover_answer_and_eos_only(tiny):
    _, codec = tiny
    s = synthetic.make_split("caption", 2, 3)
    batch = codec.train_batch(s.questions, s.answers, s.images)
    for k in range(2):
        kept = batch["labels"][k][batch["labels"][k] != -100]
        assert codec.tokenizer.decode(kept[:-1]) == s.answers[k]
        assert int(kept[-1]) == codec.tokenizer.eos_token_id
    assert (batch["input_ids"] == codec.tokenizer.convert_tokens_to_ids("<image>")).sum(1).tolist() == [16, 16]


def test_llava_hf_checkpoint_round_trip_and_refusals(tiny, tmp_path):
    model, codec = tiny
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    codec.processor.save_pretrained(tmp_path / "ckpt")
    loaded, processor = load_llava_checkpoint(tmp_path / "ckpt")
    batch = _batch(codec)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == codec.tokenizer.convert_tokens_to_ids("<image>")
    for f in (tmp_path / "ckpt").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="safetensors only"):
        load_llava_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError, match="no config.json"):
        load_llava_checkpoint(tmp_path / "nowhere")


def test_lora_linear_merge_is_exact():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, torch.randn(3, 6), torch.randn(5, 3), scale=0.5, dropout=0.0, train_A=False)
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + 0.5 * x @ (layer.B @ layer.A).T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.merged()(x), expected, atol=1e-5)
    assert "delta.down" in dict(layer.named_buffers()) and "delta.down" not in dict(layer.named_parameters())


def _ctx(codec, task, t=0):
    return _context(t, task, 5, codec, "cpu", torch.Generator().manual_seed(0))


def test_lora_ft_hooks(tiny):
    model, codec = tiny
    task = synthetic_tasks(8, 4)[0]
    method = get_mcit_method("lora")(model, LoraFT.Hparams(), Profiler(), torch.Generator().manual_seed(0))
    method.setup()
    method.before_task(_ctx(codec, task))
    assert len(method.layers) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".delta.down", ".delta.up")) or "projector" in n for n in trainable)
    groups = method.trainable_parameters()
    assert groups[1]["lr"] == method.hparams.projector_lr and groups[1]["params"]
    assert method.layers[next(iter(method.layers))].scale == pytest.approx(2.0)  # alpha = 2r
    with torch.no_grad():
        for layer in method.layers.values():
            layer.B.normal_()
    batch = _batch(codec)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        method.after_task(_ctx(codec, task))
        merged = model(**batch).logits
    assert not method.layers and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(adapted, merged, atol=1e-4)


def _plain_gradients(model, codec, task, fraction):
    """Mean gradient of each adapted weight over the official evenly spaced share (``int(N·f)`` items at
    ``linspace(0, N − 1, ·)`` truncated, as ``extract_gradients.py``), batch 1, re-derived without the method."""
    total = len(task.train)
    keep = int(total * fraction)
    idx = [int(i * (total - 1) / (keep - 1)) for i in range(keep)] if keep > 1 else [0]
    linears = adapted_linears(model)
    sums = {n: torch.zeros_like(m.weight) for n, m in linears.items()}
    model.train()
    for i in idx:
        s = task.train
        b = codec.train_batch([s.questions[i]], [s.answers[i]], s.images[i:i + 1])
        model.zero_grad()
        for m in linears.values():
            m.weight.requires_grad_(True)
        model(**b).loss.backward()
        for n, m in linears.items():
            sums[n] += m.weight.grad
    model.eval()
    return {n: (g / len(idx)).T for n, g in sums.items()}


def test_keeplora_llava_init_and_memory(tiny):
    model, codec = tiny
    task = synthetic_tasks(10, 4)[0]
    hp = KeepLoraLlava.Hparams(rank=4, alpha=1.0, dropout=0.0)
    method = KeepLoraLlava(model, hp, Profiler(), torch.Generator().manual_seed(0))
    method.setup()
    name = "model.language_model.layers.0.self_attn.q_proj"
    W = adapted_linears(model)[name].weight.detach().clone()
    # W_p: smallest p of right singular vectors with energy >= 0.6 (paper rule), computed here with a plain SVD
    _, S, Vh = torch.linalg.svd(W.double())
    p = int((torch.cumsum(S**2, 0) / (S**2).sum() < 0.6).sum()) + 1
    Wp = method.basis[name]
    assert Wp.shape == (W.shape[1], p)
    assert torch.allclose(Wp @ Wp.T, (Vh[:p].T @ Vh[:p]).float(), atol=1e-5)

    expected = _plain_gradients(model, codec, task, 0.2)
    batch = _batch(codec)
    with torch.no_grad():
        before = model(**batch).logits
    method.before_task(_ctx(codec, task))
    layer = method.layers[name]
    assert torch.count_nonzero(layer.B) == 0 and "delta.down" in dict(layer.named_buffers())  # B = 0, A frozen
    assert layer.scale == pytest.approx(0.25)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, before, atol=1e-6)  # no weight shift, output unchanged
    # A = the official sketch of Ĝ = (I - Wp Wpᵀ) G, G the mean gradient (paper layout): torch.svd_lowrank(Ĝ, q=r)
    # with torch's default 2 iterations, layer after layer from the generator the method was given (seed 0)
    torch.manual_seed(0)
    for other in method.layers:  # in the order the gradients were factorised
        U = method.basis[other]
        G_hat = expected[other] - U @ (U.T @ expected[other])
        official = torch.svd_lowrank(G_hat, q=4)[0]
        A = method.layers[other].A
        assert float((A - official.T).norm() / official.norm()) <= 1e-4, other
    assert torch.allclose(layer.A @ Wp, torch.zeros(4, p), atol=1e-5)

    with torch.no_grad():
        for lay in method.layers.values():
            lay.B.normal_(std=0.01)
    method.after_task(_ctx(codec, task))
    after = _plain_gradients(model, codec, task, 0.2)[name]
    basis = method.basis[name]
    assert basis.shape[1] > p and linalg.is_orthonormal(basis, atol=1e-4)
    assert torch.equal(basis[:, :p], Wp)
    captured = ((basis @ (basis.T @ after)) ** 2).sum() / (after**2).sum()
    assert float(captured) >= 0.99 - 1e-4


def test_keeplora_llava_a_is_the_top_r_of_the_projected_gradient(tiny):
    """Per layer, G = 10·u₁f₁ᵀ + 9·u₂f₂ᵀ + Σ_j σ_j g_j f_{j+2}ᵀ with u₁, u₂ in the stored basis U and g_j ⟂ U
    (σ = 5, 4, 3, 2): the raw gradient's top-4 directions are u₁, u₂, g₁, g₂, the projected gradient's
    Ĝ = (I − UUᵀ)G are g₁…g₄ (rank 4 = r, so the rank-r sketch finds them exactly). A must span g₁…g₄."""
    model, codec = tiny
    hp = KeepLoraLlava.Hparams(rank=4, alpha=1.0, dropout=0.0)
    method = KeepLoraLlava(model, hp, Profiler(), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    grads, expected = {}, {}
    method.basis = {}
    for name, linear in adapted_linears(model).items():
        d_in, d_out = linear.in_features, linear.out_features
        Q, _ = torch.linalg.qr(torch.randn(d_in, 7, generator=gen))
        F, _ = torch.linalg.qr(torch.randn(d_out, 6, generator=gen))
        U, free = Q[:, :3], Q[:, 3:]
        method.basis[name] = U.contiguous()
        sigma = torch.tensor([10.0, 9.0, 5.0, 4.0, 3.0, 2.0])
        directions = torch.cat([U[:, :2], free], dim=1)  # d_in × 6
        grads[name] = directions * sigma @ F.T
        expected[name] = free @ free.T
    method._gradients = lambda ctx: grads
    method.before_task(_ctx(codec, synthetic_tasks(4, 4)[0]))
    for name, layer in method.layers.items():
        assert torch.allclose(layer.A.T @ layer.A, expected[name], atol=1e-5), name


def test_keeplora_llava_share_is_the_official_linspace():
    """``extract_gradients.py``: ``int(N·f)`` items at ``torch.linspace(0, N − 1, int(N·f)).long()`` (first and last
    item included, positions truncated), written out here by hand."""
    from clbench.settings.mcit.loop import evenly_spaced_share

    assert evenly_spaced_share(10, 0.25) == [0, 9]  # int(2.5) = 2 items; i·N/k would give [0, 5]
    assert evenly_spaced_share(7, 0.5) == [0, 3, 6]  # int(3.5) = 3; round() would take 4
    assert evenly_spaced_share(10, 0.3) == [0, 4, 9]  # 4.5 truncated to 4
    assert evenly_spaced_share(5, 1.0) == [0, 1, 2, 3, 4]
    assert evenly_spaced_share(3, 0.1) == [0]  # at least one item (the official code would take none)


def test_lora_linear_merge_is_float32_under_autocast():
    """The LLaVA merge ``W + s·B·A`` in the factors' float32 whatever the caller's autocast (bf16 is ~3e-3 off)."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(32, 24)
    W = base.weight.detach().double().clone()
    A, B = torch.randn(4, 32, generator=gen), torch.randn(24, 4, generator=gen)
    layer = LoRALinear(base, A, B, scale=0.5, dropout=0.0, train_A=False)
    expected = 0.5 * B.double() @ A.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged = layer.merged()
    change = merged.weight.detach().double() - W
    assert float((change - expected).norm() / expected.norm()) <= 1e-6


def test_clip_only_method_is_refused_in_one_line():
    with pytest.raises(UserError, match="no LLaVA form"):
        get_mcit_method("zscl")


def test_training_reduces_the_loss(tiny):
    model, codec = tiny
    task = synthetic_tasks(32, 4)[0]
    method = LoraFT(model, LoraFT.Hparams(lr=1e-2, projector_lr=1e-2), Profiler(), torch.Generator().manual_seed(0))
    method.before_task(_ctx(codec, task))
    gen = torch.Generator().manual_seed(0)
    cfg = LoopConfig(batch_size=8)
    first = train_task(model, codec, task, method, cfg, 1, "cpu", gen)
    last = train_task(model, codec, task, method, cfg, 3, "cpu", gen)
    assert last < first


def test_shipped_tiny_llava_matches_its_recipe_and_knows_colours(monkeypatch, tmp_path):
    from clbench.settings.mcit import pretrain
    from clbench.settings.mcit.loop import McitTask, predict, score

    shipped = pretrain.shipped_weights()
    assert shipped is not None, ("the package ships the default recipe's tiny LLaVA (python -m "
                                 "clbench.settings.mcit.pretrain --export after a recipe change)")
    card = __import__("json").loads(pretrain.shipped_paths(pretrain.recipe_key())[1].read_text())
    assert card["key"] == pretrain.recipe_key() and card["steps"] == pretrain.STEPS
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path))
    assert pretrain.is_ready() and not pretrain.is_ready(steps=7)  # another recipe is not shipped
    model, processor = load_llava_checkpoint(pretrain.ensure_tiny_llava(on_step=lambda *a: pytest.fail("trained")))
    s = synthetic.make_split(synthetic.BASE_TASK, 32, 4242)
    task = McitTask(synthetic.BASE_TASK, "exact", s, s)
    assert score(task, predict(model, Codec(processor), task, LoopConfig()), LoopConfig())[0] >= 75.0  # chance 12.5
