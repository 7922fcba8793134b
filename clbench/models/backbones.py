"""Building backbones: any open_clip architecture, with weights by tag, by local file, or the embedded
``tiny`` model that clbench pretrains offline itself.

Nothing here downloads: tags resolve through open_clip's own cache with ``HF_HUB_OFFLINE=1``, and a missing
weight is a :class:`~clbench.errors.UserError` that says which file to put where.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from clbench.datasets.base import ImageSpec
from clbench.errors import UserError
from clbench.models.clip import ClipModel
from clbench.models.pretrain import PretrainConfig, cache_dir, config_key, pretrain
from clbench.results import atomic_write_json, atomic_write_safetensors

TINY = "tiny"
TINY_CONFIG = Path(__file__).parent / "configs" / "clbench-tiny.json"
TINY_OPEN_CLIP_NAME = "clbench-tiny"


def tiny_model_config() -> dict:
    return json.loads(TINY_CONFIG.read_text())


def _register_tiny() -> None:
    if TINY_OPEN_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG)


def _image_spec(clip: torch.nn.Module) -> ImageSpec:
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    return ImageSpec(int(size), tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD))


def _normaliser(spec: ImageSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    return lambda images: (images - mean) / std


def _create_without_weights(name: str):
    """``open_clip.create_model(name)`` with random weights, without open_clip's "No pretrained weights loaded"
    warning: clbench loads the weights itself right after (or the user asked for ``--pretrained none``)."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        return open_clip.create_model(name, pretrained=None)
    finally:
        root.removeFilter(keep)


def tiny_weights_path(cfg: PretrainConfig | None = None) -> Path:
    cfg = cfg or PretrainConfig()
    return cache_dir() / f"tiny-{config_key(tiny_model_config(), cfg)}" / "model.safetensors"


def ensure_tiny_weights(
    cfg: PretrainConfig | None = None, on_step: Callable[[int, float], None] | None = None
) -> Path:
    """Return the cached tiny weights, pretraining them first if they are not cached yet."""
    cfg = cfg or PretrainConfig()
    path = tiny_weights_path(cfg)
    if path.exists():
        return path
    _register_tiny()
    torch.manual_seed(cfg.seed)  # the random initialisation is part of what the seed determines
    clip = _create_without_weights(TINY_OPEN_CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
    state = pretrain(clip, tokenizer, _normaliser(_image_spec(clip)), cfg, on_step=on_step)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_safetensors(path, state, metadata={"pretrain": json.dumps(cfg.__dict__)})
        recipe = {"pretrain": cfg.__dict__, "model": tiny_model_config(), "key": path.parent.name,
                  "corpus": "clbench.models.pretrain.sample_corpus"}
        atomic_write_json(path.parent / "recipe.json", recipe)
    except OSError as exc:
        raise UserError(f"cannot write the tiny backbone cache at {path.parent} ({exc.strerror}); "
                        "set CLBENCH_CACHE to a writable folder") from None
    return path


def load_state_file(path: Path, allow_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """Read weights without running code: safetensors, or ``torch.load(weights_only=True)``.

    OpenAI's original ``.pt`` files are TorchScript archives, which execute code on load; they are read
    only with ``allow_torchscript=True`` (``--trust-torchscript``), which the user gives for a file they trust.
    """
    if not path.is_file():
        raise UserError(f"pretrained weight file {path} does not exist; pass an existing .safetensors/.pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise UserError(f"cannot read {path} as safetensors ({exc}); re-export it") from None
    if _is_torchscript(path):
        if not allow_torchscript:
            raise UserError(f"{path} is a TorchScript archive, which runs code when loaded; convert it to "
                            ".safetensors or pass --trust-torchscript if you trust this file")
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise UserError(f"refusing to load {path}: it is not a plain tensor checkpoint "
                        f"({type(exc).__name__}); convert it to .safetensors") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict; save the model's state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _quick_gelu(name: str, tag: str) -> bool:
    """OpenAI weights were trained with QuickGELU; open_clip 3.3 only warns when it is missing."""
    if name.endswith("-quickgelu"):
        return False
    return bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))


def load_backbone(
    name: str, pretrained: str | None = None, device: str | torch.device = "cpu", allow_torchscript: bool = False,
    on_pretrain_step: Callable[[int, float], None] | None = None,
) -> ClipModel:
    """Build backbone ``name`` with weights ``pretrained`` (a tag, a file, ``none``, or the embedded default)."""
    if name == TINY:
        _register_tiny()
        clip = _create_without_weights(TINY_OPEN_CLIP_NAME)
        tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
        if pretrained in (None, "embedded"):
            state = load_state_file(ensure_tiny_weights(on_step=on_pretrain_step))
            clip.load_state_dict(state)
        elif pretrained != "none":
            clip.load_state_dict(_checked_state(load_state_file(Path(pretrained), allow_torchscript), clip, name))
    else:
        if name not in open_clip.list_models():
            raise UserError(f"unknown backbone {name!r}; use 'tiny' or an open_clip model name "
                            "(python -c 'import open_clip; print(open_clip.list_models())')")
        tokenizer = open_clip.get_tokenizer(name)
        if pretrained in (None, "none"):
            clip = _create_without_weights(name)
        elif Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained:
            clip = _create_without_weights(name)
            clip.load_state_dict(_checked_state(load_state_file(Path(pretrained), allow_torchscript), clip, name))
        else:
            clip = _from_tag(name, pretrained)
    clip.eval()
    model = ClipModel(clip, tokenizer, _image_spec(clip), name)
    return model.to(device)


def _from_tag(name: str, tag: str) -> torch.nn.Module:
    if tag not in open_clip.list_pretrained_tags_by_model(name):
        raise UserError(f"unknown pretrained tag {tag!r} for {name}; known: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return open_clip.create_model(name, pretrained=tag, force_quick_gelu=_quick_gelu(name, tag))
    except Exception as exc:  # noqa: BLE001 - download failures surface as several types
        hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "")
        raise UserError(f"weights {name}/{tag} are not in the local cache and clbench never downloads "
                        f"({type(exc).__name__}); put them in the Hugging Face cache (repo {hub or '?'}) "
                        "or pass --pretrained /path/to/weights.safetensors") from None


def _checked_state(state: dict, clip: torch.nn.Module, name: str) -> dict:
    expected = set(clip.state_dict())
    missing = expected - set(state)
    if missing:
        raise UserError(f"the weight file does not fit backbone {name!r} ({len(missing)} tensors missing, "
                        f"e.g. {sorted(missing)[0]}); pass --backbone matching the file")
    return {k: v for k, v in state.items() if k in expected}
