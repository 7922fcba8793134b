"""Prompts, batches and decoding for any ``LlavaProcessor``: the tiny one built here or a checkpoint's own.

Prompts follow LLaVA-1.5's ``vicuna_v1`` template (MCITlib inference: ``<image>\\n`` + question); the tiny model
uses the same template without the system sentence, to keep its sequences short on 2 cores. Training labels are
-100 on the prompt and padding, so the loss is on the answer and the end-of-sequence token only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions. ")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def tiny_processor(words: list[str]):
    """A ``LlavaProcessor`` over a word-level vocabulary (specials first, ``<image>`` last), fully offline."""
    from clbench.extras import require

    require("tokenizers", "the MCIT setting (LLaVA)")
    require("transformers", "the MCIT setting (LLaVA)")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([s for s in SPECIALS if s != "<image>"] +
                                        [w for w in ("USER", ":", "ASSISTANT", *words) if w not in SPECIALS])}
    vocab["<image>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


@dataclass
class Codec:
    """Turns (question, answer, image) triples into model inputs and generated ids back into text."""

    processor: object
    system: str = ""

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def prompt(self, question: str) -> str:
        return f"{self.system}USER: <image>\n{question} ASSISTANT:"

    def _call(self, texts: list[str], images: Tensor | list, side: str) -> dict[str, Tensor]:
        self.tokenizer.padding_side = side
        pictures = list(_uint8(images)) if isinstance(images, Tensor) else list(images)
        return dict(self.processor(text=texts, images=pictures, return_tensors="pt", padding=True))

    def train_batch(self, questions: list[str], answers: list[str], images: Tensor) -> dict[str, Tensor]:
        """Right-padded inputs with labels on the answer and ``</s>`` only."""
        prompts = [self.prompt(q) for q in questions]
        eos = self.tokenizer.eos_token
        full = self._call([f"{p} {a}{eos}" for p, a in zip(prompts, answers, strict=True)], images, "right")
        prompt_len = self._call(prompts, images, "right")["attention_mask"].sum(1)
        labels = full["input_ids"].clone()
        positions = torch.arange(labels.shape[1])[None]
        labels[(positions < prompt_len[:, None]) | (full["attention_mask"] == 0)] = -100
        full["labels"] = labels
        return full

    def prompt_batch(self, questions: list[str], images: Tensor) -> dict[str, Tensor]:
        """Left-padded prompts for generation."""
        return self._call([self.prompt(q) for q in questions], images, "left")

    def decode(self, new_tokens: Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def generate(model, codec: Codec, questions: list[str], images: Tensor, max_new_tokens: int) -> list[str]:
    """Greedy decoding (``do_sample=False``, one beam), as MCITlib's inference with temperature 0."""
    batch = codec.prompt_batch(questions, images)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                         pad_token_id=codec.tokenizer.pad_token_id, eos_token_id=codec.tokenizer.eos_token_id)
    return codec.decode(out[:, batch["input_ids"].shape[1]:])
