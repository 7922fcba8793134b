"""LLaVA backbones through Hugging Face transformers: a local ``llava-hf`` checkpoint, or the embedded tiny LLaVA.

- ``load_llava_checkpoint(path)``: ``LlavaForConditionalGeneration`` + its processor from a local folder, local
  files only and safetensors only (a folder with only ``*.bin`` weights is refused: those are pickles).
- ``tiny_llava(vocab)``: a small CLIP vision tower (32 px, patch 8, 16 image tokens) + the ``gelu`` MLP projector +
  a 2-layer Llama, the pattern of transformers' own LLaVA tests, sized for 2 CPU cores.
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
    try:
        import transformers
    except ImportError:
        raise UserError("the MCIT setting (LLaVA) needs Hugging Face transformers: pip install 'clbench[mcit]'") \
            from None
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
               vision_layers: int = 3):
    """A randomly initialised tiny ``LlavaForConditionalGeneration`` (32 px images, 16 image tokens); the vision
    tower is wider and one layer deeper than the language model, since LLaVA reads its penultimate layer."""
    import torch

    tf = _transformers()
    vision = tf.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                 num_hidden_layers=vision_layers,
                                 num_attention_heads=4, image_size=32, patch_size=8)
    text = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=64, tie_word_embeddings=False)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                            image_seq_length=16, projector_hidden_act="gelu", vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return tf.LlavaForConditionalGeneration(config)


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
