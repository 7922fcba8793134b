"""The embedded tiny backbone's weights as shipped in the package, beside the recipe that made them.

Pretraining the tiny CLIP (:mod:`clbench.models.pretrain`) takes several minutes on two cores, so the package
carries its result: ``clbench/models/weights/tiny-<key>.safetensors`` in float16 (the recipe's float32 output
rounded once; half the size, under the package's 25 MB budget) and ``tiny-<key>.json``, the recipe (model and
pretraining configs, corpus version, seed), the torch version and thread count it ran with, and a SHA-256 of the
float32 state. ``<key>`` is :func:`clbench.models.pretrain.config_key` of the current code's configs, so a change
to the model, the corpus or the pretraining settings stops matching the shipped file and the recipe runs again
(into the user cache) instead of silently using weights made by another recipe.

Every user of the embedded default therefore starts from the same weights; ``clbench pretrain --verify`` re-runs
the recipe and reports how far its output is from the shipped file, and ``clbench pretrain --export`` (for
maintainers) writes a new pair after a change to the recipe.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SHIPPED_DIR = Path(__file__).parent / "weights"
SHIPPED_DTYPE = torch.float16


def shipped_paths(key: str, folder: Path | None = None) -> tuple[Path, Path]:
    """The weights file and its recipe JSON for config key ``key``."""
    folder = folder or SHIPPED_DIR
    return folder / f"tiny-{key}.safetensors", folder / f"tiny-{key}.json"


def shipped_weights(key: str) -> Path | None:
    """The shipped weights made by the current recipe (config key ``key``), if the package has them."""
    weights, recipe = shipped_paths(key)
    return weights if weights.is_file() and recipe.is_file() else None


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def load_shipped(path: Path) -> dict[str, torch.Tensor]:
    """The shipped weights as float32 tensors (the dtype every run computes in)."""
    from safetensors.torch import load_file

    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}


def export_shipped(state: dict[str, torch.Tensor], recipe: dict, key: str, folder: Path | None = None) -> Path:
    """Write ``state`` rounded to float16 and its recipe (with the float32 state's digest) for the package;
    the torch version and thread count default to this process's unless ``recipe`` (the cache's record of the
    pretraining run) names them."""
    from clbench.storage.results import atomic_write_json, atomic_write_safetensors

    weights, recipe_path = shipped_paths(key, folder)
    weights.parent.mkdir(parents=True, exist_ok=True)
    half = {k: v.to(SHIPPED_DTYPE) if v.is_floating_point() else v for k, v in state.items()}
    atomic_write_safetensors(weights, half, metadata={"key": key, "stored_dtype": str(SHIPPED_DTYPE)})
    record = {"torch": torch.__version__, "threads": torch.get_num_threads(), **recipe, "key": key,
              "stored_dtype": str(SHIPPED_DTYPE), "float32_sha256": state_digest(state)}
    atomic_write_json(recipe_path, record)
    return weights


def compare_to_shipped(state: dict[str, torch.Tensor], shipped: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far a float32 recipe output is from the shipped weights: the largest absolute difference before and
    after rounding the recipe's output to the shipped dtype (0.0 after rounding means the same weights)."""
    if set(state) != set(shipped):
        raise ValueError("the recipe's output and the shipped weights name different tensors")
    raw = max(float((state[k].float() - shipped[k].float()).abs().max()) for k in state if state[k].numel())
    rounded = max(float((state[k].to(SHIPPED_DTYPE).float() - shipped[k].float()).abs().max())
                  for k in state if state[k].numel())
    return {"max_abs_diff": raw, "max_abs_diff_after_rounding": rounded}


def read_recipe(key: str) -> dict:
    """The shipped recipe JSON for ``key``."""
    return json.loads(shipped_paths(key)[1].read_text())
