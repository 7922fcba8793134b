"""Seeded instruction pre-training of the tiny LLaVA, cached as a ``llava-hf`` folder (safetensors + processor).

The base model learns general visual knowledge that the sequence should keep and can build on: naming an object's
colour (``colour-name``, scored as the base task), naming colour and shape ("what is this ?" -> "red circle"),
counting circles ("how many ?" -> "3"), and repeating words ("say west A"), which trains the output rows of the
whole vocabulary. Everything is trained (vision tower included) with AdamW; the result is a pure function of the
seed and the step count, and its folder name carries a hash of both and of the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from clbench.mcit import synthetic
from clbench.mcit.backbone import load_llava_checkpoint, tiny_llava
from clbench.mcit.codec import Codec, tiny_processor

STEPS = 1000
EXTRA_WORDS = ("say", "how", "many")
POOL = 2048
BATCH = 32
LR = 1e-3
SEED = 0


def _cache_root() -> Path:
    root = os.environ.get("CLBENCH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "clbench")
    return Path(root).expanduser()


def tiny_llava_path(steps: int = STEPS, seed: int = SEED) -> Path:
    """Where the pre-trained tiny LLaVA for these settings is cached."""
    key = json.dumps({"vocab": synthetic.vocabulary(), "steps": steps, "seed": seed, "batch": BATCH, "lr": LR,
                      "pool": POOL, "version": 3}, sort_keys=True)
    return _cache_root() / f"tiny-llava-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _say_split(n: int, gen: torch.Generator) -> synthetic.Split:
    words = [w for w in synthetic.vocabulary() if w not in ("?", ".")]
    picks = torch.randint(len(words), (n, 2), generator=gen).tolist()
    answers = [f"{words[a]} {words[b]}" for a, b in picks]
    images = synthetic.make_split(synthetic.BASE_TASK, n, int(torch.randint(1 << 30, (1,), generator=gen))).images
    return synthetic.Split([f"say {a}" for a in answers], answers, [[a] for a in answers], images)


def _object_split(n: int, seed: int) -> synthetic.Split:
    """"what is this ?" -> "<colour> <shape>": the image of a caption, without the caption task's wording."""
    s = synthetic.make_split("caption", n, seed)
    answers = [" ".join(r[0].split()[2:4]) for r in s.references]
    return synthetic.Split(["what is this ?"] * n, answers, [[a] for a in answers], s.images)


def _count_split(n: int, seed: int) -> synthetic.Split:
    """"how many ?" -> the number of circles (1 to 4), from the count-math images."""
    s = synthetic.make_split("count-math", n, seed)
    counts = [str(int(a) - 1 - synthetic.NUMBERS.index(q.split()[-2])) for q, a in zip(s.questions, s.answers,
                                                                                       strict=True)]
    return synthetic.Split(["how many ?"] * n, counts, [[c] for c in counts], s.images)


def pretrain_tiny(steps: int = STEPS, seed: int = SEED, on_step: Callable[[int, int], None] | None = None):
    """Build and pre-train the tiny LLaVA; returns ``(model, processor)``."""
    processor = tiny_processor([*synthetic.vocabulary(), *EXTRA_WORDS])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    model = tiny_llava(len(processor.tokenizer), image_id, seed=seed)
    codec = Codec(processor)
    gen = torch.Generator().manual_seed(seed)
    splits = [synthetic.make_split(synthetic.BASE_TASK, POOL, seed + 11), _object_split(POOL, seed + 12),
              _count_split(POOL, seed + 13), _say_split(POOL, gen)]
    pools = [codec.train_batch(s.questions, s.answers, s.images) for s in splits]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        pool = pools[step % len(pools)]
        idx = torch.randint(POOL, (BATCH,), generator=gen)
        loss = model(**{k: v[idx] for k, v in pool.items()}).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step(step + 1, steps)
    model.eval()
    return model, processor


def ensure_tiny_llava(on_step: Callable[[int, int], None] | None = None, steps: int = STEPS) -> Path:
    """The cached pre-trained tiny LLaVA folder, pre-training it first if absent (written atomically)."""
    path = tiny_llava_path(steps)
    if (path / "config.json").is_file():
        return path
    model, processor = pretrain_tiny(steps, on_step=on_step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").is_file():
            raise
    return path


def load_tiny_llava(on_step: Callable[[int, int], None] | None = None):
    """``(model, processor)`` of the cached pre-trained tiny LLaVA (pre-trained on first use)."""
    return load_llava_checkpoint(ensure_tiny_llava(on_step))
