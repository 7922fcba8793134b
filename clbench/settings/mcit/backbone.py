"""LLaVA backbones through Hugging Face transformers: a local ``llava-hf`` checkpoint, or the embedded tiny LLaVA.

- ``load_llava_checkpoint(path)``: ``LlavaForConditionalGeneration`` + its processor from a local folder, local
  files only and safetensors only (a folder with only ``*.bin`` weights is refused: those are pickles).
- ``tiny_llava(vocab)``: a CLIP vision tower of the tiny CLIP's shape (32 px, patch 8, 16 image tokens, width 128,
  4 layers) + the ``gelu`` MLP projector + a 2-layer Llama (width 64), the pattern of transformers' own LLaVA
  tests, sized for 2 CPU cores; ``load_clip_tower`` puts clbench's pre-trained tiny CLIP image encoder into it.
- ``adapted_linears(model)``: MCITlib's ``find_all_linear_names`` rule by pattern, not fixed paths (module paths
  moved in transformers' ~4.52 refactor): every ``nn.Linear`` outside the vision tower, projector and resampler,
  except ``lm_head``.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from clbench.errors import UserError

EXCLUDED = ("vision_tower", "multi_modal_projector", "mm_projector", "vision_resampler")
PROJECTOR = re.compile(r"(^|\.)(multi_modal_projector|mm_projector)(\.|$)")


def _transformers():
    from clbench.extras import require

    transformers = require("transformers", "the MCIT setting (LLaVA)")
    transformers.utils.logging.disable_progress_bar()  # clbench shows its own progress
    return transformers


def adapted_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The language model's linear layers that LoRA adapts (q, k, v, o, gate, up, down of every decoder layer)."""
    found = {name: mod for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and not any(part in name.split(".") for part in EXCLUDED)
             and name.split(".")[-1] != "lm_head"}
    if not found:
        raise UserError("no linear layer of the language model found to adapt; is this a LLaVA model?")
    return found


def projector_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the multimodal projector (trained at its own learning rate)."""
    return [p for name, p in model.named_parameters() if PROJECTOR.search(name)]


def tiny_llava(vocab_size: int, image_token_index: int, seed: int = 0, hidden: int = 64, vision_hidden: int = 128,
               vision_layers: int = 4):
    """A randomly initialised tiny ``LlavaForConditionalGeneration`` (32 px images, 16 image tokens) whose vision
    tower has the shape of clbench's tiny CLIP image encoder (width 128, 4 layers, exact GELU), so that
    :func:`load_clip_tower` can put that CLIP's weights in it, as LLaVA's tower is a pre-trained CLIP."""
    import torch

    tf = _transformers()
    vision = tf.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                 num_hidden_layers=vision_layers, num_attention_heads=vision_hidden // 32,
                                 image_size=32, patch_size=8, hidden_act="gelu")
    text = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=64, tie_word_embeddings=False)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                            image_seq_length=16, projector_hidden_act="gelu", vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return tf.LlavaForConditionalGeneration(config)


def vision_tower(model: nn.Module) -> nn.Module:
    """The LLaVA model's vision tower (a ``CLIPVisionModel``), wherever the transformers version puts it."""
    return next(m for n, m in model.named_modules() if n.split(".")[-1] == "vision_tower")


def clip_tower_state(state: dict) -> dict:
    """An open_clip ``visual.*`` state (clbench's tiny CLIP) as a ``CLIPVisionModel`` state: the same
    pre-norm ViT (class token, ``ln_pre``, fused ``in_proj`` split into q / k / v); ``ln_post`` becomes
    ``post_layernorm`` and the CLIP embedding projection is dropped (LLaVA reads patch features)."""
    out = {"vision_model.embeddings.class_embedding": state["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
           "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
           "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
           "vision_model.post_layernorm.bias": state["visual.ln_post.bias"]}
    k = 0
    while f"visual.transformer.resblocks.{k}.ln_1.weight" in state:
        src, dst = f"visual.transformer.resblocks.{k}.", f"vision_model.encoder.layers.{k}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[dst + b + ".weight"], out[dst + b + ".bias"] = state[src + a + ".weight"], state[src + a + ".bias"]
        for part, w, b in zip(("q", "k", "v"), state[src + "attn.in_proj_weight"].chunk(3),
                              state[src + "attn.in_proj_bias"].chunk(3), strict=True):
            out[f"{dst}self_attn.{part}_proj.weight"], out[f"{dst}self_attn.{part}_proj.bias"] = w, b
        k += 1
    return out


def load_clip_tower(model: nn.Module, state: dict) -> None:
    """Put an open_clip ``visual.*`` state into the LLaVA model's vision tower (every tensor, strictly)."""
    tower = vision_tower(model)
    mapped = clip_tower_state(state)
    if not any(k.startswith("vision_model.") for k in tower.state_dict()):  # the tower is the transformer itself
        mapped = {k.removeprefix("vision_model."): v for k, v in mapped.items()}
    tower.load_state_dict(mapped, strict=True)


def load_llava_checkpoint(path: str | Path):
    """Model and processor of a local ``llava-hf``-format folder (``config.json`` + ``*.safetensors``)."""
    tf = _transformers()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a llava-hf checkpoint folder (no config.json); pass the folder that "
                        "save_pretrained wrote")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no *.safetensors weights; clbench loads safetensors only (convert .bin "
                        "pickles with transformers' save_pretrained(safe_serialization=True))")
    try:
        model = tf.LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{folder}: cannot load a LlavaForConditionalGeneration ({' '.join(str(exc).split())[:200]})"
                        ) from None
    try:
        processor = tf.AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: no usable processor / tokenizer files ({' '.join(str(exc).split())[:160]}); "
                        "save the processor beside the model") from None
    return model, processor
