"""Seeded instruction pre-training of the tiny LLaVA, shipped in the package and cached as a ``llava-hf`` folder.

The base model learns the general visual and instruction knowledge that the sequence builds on and should keep,
each in its own wording, none in a task's (as CLIP and Vicuna partly know UCIT's domains before LLaVA's tuning):
naming an object's colour (``colour-name``, scored as the base task), naming colour and shape ("what is this ?"
-> "red circle"), size, shape and place ("where is it ?" -> "big star top"), the two shapes of a pair, left one
first ("what is this ?" -> "star and ring"), counting circles ("how many ?" -> "3"), multiple choice over shapes
("which shape ? A ring B star ..." -> "B"), and repeating a word ("say west" -> "west"), which trains the output
row of every vocabulary word. The projector and the language model are trained with AdamW under a one-cycle
schedule; the vision tower is the tiny CLIP's image encoder, frozen as LLaVA's CLIP tower is;
the result is a pure function of :func:`recipe` (vocabulary, corpus version, model sizes, steps, seed, rates), and
its folder name carries a hash of it.

Pre-training takes tens of minutes on two cores, so the package ships the default recipe's output
(``clbench/settings/mcit/weights/tiny-llava-<key>.safetensors``, ``save_pretrained``'s float32 file, with the recipe as
``tiny-llava-<key>.json`` beside it); it is used only when ``<key>`` is the current recipe's, so any change to the
corpus, model or settings pre-trains again into the cache instead. ``python -m clbench.settings.mcit.pretrain --export``
(maintainers) writes a new pair.
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

from clbench.models.backbones import embedded_tiny_state, tiny_key
from clbench.settings.mcit import synthetic
from clbench.settings.mcit.backbone import load_clip_tower, load_llava_checkpoint, tiny_llava, vision_tower
from clbench.settings.mcit.codec import Codec, tiny_processor

STEPS = 1200
EXTRA_WORDS = ("say", "how", "many", "it")
POOL = 2048
BATCH = 32
LR = 1e-3
SEED = 0
VERSION = 4  # of the corpus: bump on any change to the splits below
MODEL = {"hidden": 64, "vision_hidden": 128, "vision_layers": 4}
SHIPPED_DIR = Path(__file__).parent / "weights"


def _cache_root() -> Path:
    root = os.environ.get("CLBENCH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "clbench")
    return Path(root).expanduser()


def recipe(steps: int = STEPS, seed: int = SEED) -> dict:
    """Everything the pre-trained weights are a function of (the corpus by its version, the vision tower by the
    tiny CLIP's config key)."""
    return {"clip_tower": tiny_key(), "vocab": synthetic.vocabulary(), "extra_words": list(EXTRA_WORDS),
            "steps": steps, "seed": seed, "batch": BATCH, "lr": LR, "pool": POOL, "model": MODEL, "version": VERSION}


def recipe_key(steps: int = STEPS, seed: int = SEED) -> str:
    return hashlib.sha256(json.dumps(recipe(steps, seed), sort_keys=True).encode()).hexdigest()[:12]


def tiny_llava_path(steps: int = STEPS, seed: int = SEED) -> Path:
    """Where the pre-trained tiny LLaVA for these settings is cached."""
    return _cache_root() / f"tiny-llava-{recipe_key(steps, seed)}"


def shipped_paths(key: str, folder: Path | None = None) -> tuple[Path, Path]:
    """The package's weights file and recipe JSON for recipe key ``key``."""
    folder = folder or SHIPPED_DIR
    return folder / f"tiny-llava-{key}.safetensors", folder / f"tiny-llava-{key}.json"


def shipped_weights(steps: int = STEPS, seed: int = SEED) -> Path | None:
    """The shipped weights of the current recipe, if the package has them (a changed recipe never matches)."""
    weights, card = shipped_paths(recipe_key(steps, seed))
    return weights if weights.is_file() and card.is_file() else None


def _say_split(n: int, gen: torch.Generator) -> synthetic.Split:
    """"say <word>" -> the word: trains the output row of every vocabulary word (letters, sides, digits too)."""
    words = [w for w in synthetic.vocabulary() if w not in ("?", ".")]
    answers = [words[i] for i in torch.randint(len(words), (n,), generator=gen).tolist()]
    images = synthetic.make_split(synthetic.BASE_TASK, n, int(torch.randint(1 << 30, (1,), generator=gen))).images
    return synthetic.Split([f"say {a}" for a in answers], answers, [[a] for a in answers], images)


def _object_split(n: int, seed: int) -> synthetic.Split:
    """"what is this ?" -> "<colour> <shape>" on one centred object (shape-qa's images share this generator)."""
    shapes, colours = synthetic.make_split("shape-qa", n, seed), synthetic.make_split(synthetic.BASE_TASK, n, seed)
    answers = [f"{c} {s}" for c, s in zip(colours.answers, shapes.answers, strict=True)]
    return synthetic.Split(["what is this ?"] * n, answers, [[a] for a in answers], shapes.images)


def _place_split(n: int, seed: int) -> synthetic.Split:
    """"where is it ?" -> "<size> <shape> <place>" on the caption task's images, without its wording."""
    s = synthetic.make_split("caption", n, seed)
    answers = [" ".join(r[0].split()[k] for k in (1, 3, -1)) for r in s.references]
    return synthetic.Split(["where is it ?"] * n, answers, [[a] for a in answers], s.images)


def _choice_split(n: int, seed: int) -> synthetic.Split:
    """"which shape ? A <shape> B <shape> C <shape> D <shape>" -> the letter: the multiple-choice skill an
    instruction-tuned base model brings (on shapes; colour-mc asks it about colours)."""
    s = synthetic.make_split("shape-qa", n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    questions, answers = [], []
    for shape in s.answers:
        right = synthetic.SHAPES.index(shape)
        others = [i for i in torch.randperm(len(synthetic.SHAPES), generator=gen).tolist() if i != right][:3]
        slot = int(torch.randint(4, (1,), generator=gen))
        options = others[:slot] + [right] + others[slot:]
        questions.append("which shape ? " + " ".join(f"{synthetic.LETTERS[k]} {synthetic.SHAPES[o]}"
                                                      for k, o in enumerate(options)))
        answers.append(synthetic.LETTERS[slot])
    return synthetic.Split(questions, answers, [[a] for a in answers], s.images)


def _count_split(n: int, seed: int) -> synthetic.Split:
    """"how many ?" -> the number of circles (1 to 4), from the count-math images."""
    s = synthetic.make_split("count-math", n, seed)
    counts = [str(int(a) - 1 - synthetic.NUMBERS.index(q.split()[-2])) for q, a in zip(s.questions, s.answers,
                                                                                       strict=True)]
    return synthetic.Split(["how many ?"] * n, counts, [[c] for c in counts], s.images)


def _pair_split(n: int, seed: int) -> synthetic.Split:
    """"what is this ?" -> "<left shape> and <right shape>" on the side-qa task's two-shape images."""
    s = synthetic.make_split("side-qa", n, seed)
    answers = [f"{left} and {right}" for left, right in synthetic.side_shapes(n, seed)]
    return synthetic.Split(["what is this ?"] * n, answers, [[a] for a in answers], s.images)


def pretrain_tiny(steps: int = STEPS, seed: int = SEED, on_step: Callable[[int, int], None] | None = None):
    """Build and pre-train the tiny LLaVA; returns ``(model, processor)``."""
    processor = tiny_processor([*synthetic.vocabulary(), *EXTRA_WORDS])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    model = tiny_llava(len(processor.tokenizer), image_id, seed=seed, **MODEL)
    load_clip_tower(model, embedded_tiny_state()[0])  # LLaVA's tower is a pre-trained CLIP, frozen here too
    vision_tower(model).requires_grad_(False)
    codec = Codec(processor)
    gen = torch.Generator().manual_seed(seed)
    splits = [synthetic.make_split(synthetic.BASE_TASK, POOL, seed + 11), _object_split(POOL, seed + 12),
              _place_split(POOL, seed + 14), _count_split(POOL, seed + 13), _pair_split(POOL, seed + 15),
              _choice_split(POOL, seed + 16), _say_split(POOL, gen)]
    pools = [codec.train_batch(s.questions, s.answers, s.images) for s in splits]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
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


def _unpack_shipped(weights: Path, folder: Path) -> None:
    """A ``llava-hf`` folder from the shipped weights (``save_pretrained``'s own file, so transformers maps its
    keys on loading in any supported version), the config the code builds, and the vocabulary's processor."""
    processor = tiny_processor([*synthetic.vocabulary(), *EXTRA_WORDS])
    model = tiny_llava(len(processor.tokenizer), processor.tokenizer.convert_tokens_to_ids("<image>"), **MODEL)
    model.config.save_pretrained(folder)
    shutil.copyfile(weights, folder / "model.safetensors")
    processor.save_pretrained(folder)
    _, info = model.__class__.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                              output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise RuntimeError(f"{weights.name} does not fit the tiny LLaVA (missing {info['missing_keys'][:2]}, "
                           f"unexpected {info['unexpected_keys'][:2]})")


def is_ready(steps: int = STEPS) -> bool:
    """True when no pre-training is needed: the weights are cached or shipped with the package."""
    return (tiny_llava_path(steps) / "config.json").is_file() or shipped_weights(steps) is not None


def ensure_tiny_llava(on_step: Callable[[int, int], None] | None = None, steps: int = STEPS) -> Path:
    """The cached pre-trained tiny LLaVA folder: unpacked from the package's shipped weights when they match the
    recipe, else pre-trained here first (written atomically)."""
    path = tiny_llava_path(steps)
    if (path / "config.json").is_file():
        return path
    shipped = shipped_weights(steps)
    model, processor = (None, None) if shipped else pretrain_tiny(steps, on_step=on_step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        if shipped:
            _unpack_shipped(shipped, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").is_file():
            raise
    return path


def export_shipped(model, steps: int = STEPS, seed: int = SEED, folder: Path | None = None) -> Path:
    """Write the pre-trained model's float32 state and its recipe card into the package (maintainers)."""
    from clbench.models.shipped import state_digest
    from clbench.storage.results import atomic_write_json

    key = recipe_key(steps, seed)
    weights, card = shipped_paths(key, folder)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(Path(tmp) / "model.safetensors", weights)
    atomic_write_json(card, {"command": "python -m clbench.settings.mcit.pretrain --export", "key": key,
                             "corpus": "clbench.settings.mcit.pretrain.pretrain_tiny", **recipe(steps, seed),
                             "torch": torch.__version__, "threads": torch.get_num_threads(),
                             "float32_sha256": state_digest(state)})
    return weights


def load_tiny_llava(on_step: Callable[[int, int], None] | None = None):
    """``(model, processor)`` of the cached pre-trained tiny LLaVA (pre-trained on first use)."""
    return load_llava_checkpoint(ensure_tiny_llava(on_step))


if __name__ == "__main__":  # maintainers: pre-train with the current recipe and ship the result in the package
    import sys

    if sys.argv[1:] != ["--export"]:
        raise SystemExit("usage: python -m clbench.settings.mcit.pretrain --export")
    trained, _ = pretrain_tiny()
    print(export_shipped(trained))
