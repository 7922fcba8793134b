"""Building backbones: any open_clip architecture, with weights by tag, by local file, or the embedded
``tiny`` model that clbench pretrains offline itself.

Nothing here downloads unless the user opts in (``--allow-download`` or ``CLBENCH_ALLOW_DOWNLOAD=1``): a tag
resolves to a file already in the Hugging Face cache or open_clip's ``~/.cache/clip`` by a purely local lookup
(no request is made), and a missing weight is a :class:`~clbench.errors.UserError` that says which file to put where.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from clbench.datasets.base import ImageSpec
from clbench.errors import UserError
from clbench.models.clip import ClipModel
from clbench.models.pretrain import PretrainConfig, cache_dir, config_key, pretrain
from clbench.models.shipped import load_shipped, shipped_weights
from clbench.storage.results import atomic_write_json, atomic_write_safetensors
from clbench.storage.safeio import check_regular

TINY = "tiny"
TINY_CONFIG = Path(__file__).parent / "configs" / "clbench-tiny.json"
TINY_OPEN_CLIP_NAME = "clbench-tiny"


def tiny_model_config() -> dict:
    return json.loads(TINY_CONFIG.read_text())


def _register_tiny() -> None:
    if TINY_OPEN_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG)


OPEN_CLIP_CONFIG = "open_clip_config.json"  # the file beside exported weights (open_clip's hf-hub / local-dir form)


def preprocess_config(name: str, pretrained: str | None) -> tuple[dict, str]:
    """open_clip's preprocessing fields (``PreprocessCfg``: mean, std, interpolation, resize_mode, fill_color) for
    backbone ``name`` with weights ``pretrained``, and where they came from; read from configs only (no weights).

    As ``open_clip.create_model_and_transforms`` resolves them: ``PreprocessCfg``'s defaults (OpenAI's mean/std,
    bicubic, shortest side), overlaid by the tag's pretrained config (``open_clip.get_pretrained_cfg``); for a weight
    file, by the ``preprocess_cfg`` of an ``open_clip_config.json`` beside it (the form open_clip exports and reads
    for ``local-dir:``), else the defaults. The image size is the model's (see :func:`_image_spec`)."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    base = asdict(PreprocessCfg())
    defaults = "open_clip defaults (OpenAI mean/std, bicubic, shortest side)"
    if pretrained in (None, "", "none", "embedded"):
        return base, defaults
    if _is_weight_file(pretrained):
        beside = Path(pretrained).expanduser().parent / OPEN_CLIP_CONFIG
        if not beside.is_file():
            return base, f"open_clip defaults (no {OPEN_CLIP_CONFIG} beside {pretrained})"
        try:
            overlay = json.loads(beside.read_text()).get("preprocess_cfg", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"cannot read {beside} ({type(exc).__name__}); fix it or remove it to use open_clip's "
                            "default preprocessing") from None
        if not isinstance(overlay, dict):
            raise UserError(f"{beside}: preprocess_cfg is not an object; fix it or remove it")
        return merge_preprocess_dict(base, overlay), str(beside)
    if name == TINY:
        return base, defaults
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        return base, "open_clip defaults (unknown tag)"
    return merge_preprocess_dict(base, tag_cfg), f"open_clip pretrained config {name}/{pretrained}"


def _is_weight_file(pretrained: str) -> bool:
    return Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained


def _image_spec(clip: torch.nn.Module, name: str = TINY, pretrained: str | None = None) -> ImageSpec:
    """The backbone's preprocessing: :func:`preprocess_config`, at the model's own image size."""
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    cfg, source = preprocess_config(name, pretrained)
    return ImageSpec(int(size), tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
                     interpolation=str(cfg["interpolation"]), resize_mode=str(cfg["resize_mode"]),
                     fill_color=int(cfg.get("fill_color", 0)), source=source)


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


def tiny_key(cfg: PretrainConfig | None = None) -> str:
    """The config key of the tiny backbone's recipe (model config + pretraining config + corpus version)."""
    return config_key(tiny_model_config(), cfg or PretrainConfig())


def tiny_weights_path(cfg: PretrainConfig | None = None) -> Path:
    """Where the recipe's own (float32) output is cached for this user."""
    return cache_dir() / f"tiny-{tiny_key(cfg)}" / "model.safetensors"


def tiny_recipe(cfg: PretrainConfig) -> dict:
    """What made the tiny weights: written beside the cached and the shipped weights."""
    return {"pretrain": cfg.__dict__, "model": tiny_model_config(), "key": tiny_key(cfg),
            "corpus": "clbench.models.pretrain.sample_corpus", "command": "clbench pretrain"}


def tiny_weights_ready(cfg: PretrainConfig | None = None) -> bool:
    """True when the embedded backbone needs no pretraining: shipped with the package, or already cached."""
    return shipped_weights(tiny_key(cfg)) is not None or tiny_weights_path(cfg).exists()


def run_tiny_recipe(cfg: PretrainConfig, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Pretrain the tiny backbone from its seeded random initialisation; returns the float32 state."""
    _register_tiny()
    torch.manual_seed(cfg.seed)  # the random initialisation is part of what the seed determines
    clip = _create_without_weights(TINY_OPEN_CLIP_NAME)
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
    return pretrain(clip, tokenizer, _normaliser(_image_spec(clip)), cfg, on_step=on_step)


def ensure_tiny_weights(
    cfg: PretrainConfig | None = None, on_step: Callable[[int, float], None] | None = None
) -> Path:
    """Return the user-cached recipe output (float32), pretraining it first if it is not cached yet."""
    cfg = cfg or PretrainConfig()
    path = tiny_weights_path(cfg)
    if path.exists():
        return path
    state = run_tiny_recipe(cfg, on_step)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_safetensors(path, state, metadata={"pretrain": json.dumps(cfg.__dict__)})
        atomic_write_json(path.parent / "recipe.json", {**tiny_recipe(cfg), "torch": torch.__version__,
                                                        "threads": torch.get_num_threads()})
    except OSError as exc:
        raise UserError(f"cannot write the tiny backbone cache at {path.parent} ({exc.strerror}); "
                        "set CLBENCH_CACHE to a writable folder") from None
    return path


def embedded_tiny_state(
    cfg: PretrainConfig | None = None, on_step: Callable[[int, float], None] | None = None
) -> tuple[dict[str, torch.Tensor], Path]:
    """The embedded backbone's float32 weights and their file: the package's shipped weights when they were made
    by the current recipe (every user starts from the same weights), else the user cache, pretraining first."""
    cfg = cfg or PretrainConfig()
    shipped = shipped_weights(tiny_key(cfg))
    if shipped is not None:
        return load_shipped(shipped), shipped
    path = ensure_tiny_weights(cfg, on_step)
    return load_state_file(path), path


def load_state_file(path: Path, allow_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """Read weights without running code: safetensors, or ``torch.load(weights_only=True)``.

    OpenAI's original ``.pt`` files are TorchScript archives, which execute code on load; they are read
    only with ``allow_torchscript=True`` (``--trust-torchscript``), which the user gives for a file they trust.
    """
    if not path.exists():
        raise UserError(f"pretrained weight file {path} does not exist; pass an existing .safetensors/.pt file")
    # /dev/zero, a FIFO, a folder: named and refused before anything opens it (a FIFO would block the read)
    check_regular(path, "pretrained weight file", "pass a .safetensors/.pt weight file")
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
    on_pretrain_step: Callable[[int, float], None] | None = None, allow_download: bool = False,
) -> ClipModel:
    """Build backbone ``name`` with weights ``pretrained`` (a tag, a file, ``none``, or the embedded default).

    A tag loads from local files only, unless ``allow_download`` or ``CLBENCH_ALLOW_DOWNLOAD=1``.
    """
    weights = pretrained or "embedded"
    if name == TINY:
        _register_tiny()
        clip = _create_without_weights(TINY_OPEN_CLIP_NAME)
        tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
        if pretrained in (None, "embedded"):
            state, source = embedded_tiny_state(on_step=on_pretrain_step)
            clip.load_state_dict(state)
            weights = str(source)
        elif pretrained != "none":
            clip.load_state_dict(_checked_state(load_state_file(Path(pretrained), allow_torchscript), clip, name))
    else:
        if name not in open_clip.list_models():
            raise UserError(f"unknown backbone {name!r}; use 'tiny' or an open_clip model name "
                            "(python -c 'import open_clip; print(open_clip.list_models())')")
        with _hub_offline(not downloads_allowed(allow_download)):  # e.g. a Hugging Face tokenizer stays local
            if pretrained in (None, "none"):
                clip = _create_without_weights(name)
            elif _is_weight_file(pretrained):
                clip = _create_without_weights(name)
                clip.load_state_dict(_checked_state(load_state_file(Path(pretrained), allow_torchscript), clip,
                                                    name))
            else:  # weights first: a missing file is refused before anything else is built
                clip = _from_tag(name, pretrained, allow_download)
            tokenizer = open_clip.get_tokenizer(name)
    clip.eval()
    model = ClipModel(clip, tokenizer, _image_spec(clip, name, pretrained), name)
    model.weights = weights  # recorded in each run's manifest: which file the run started from
    return model.to(device)


ALLOW_DOWNLOAD_ENV = "CLBENCH_ALLOW_DOWNLOAD"


def downloads_allowed(flag: bool = False) -> bool:
    """Whether weights may be fetched from the network: ``--allow-download`` or ``CLBENCH_ALLOW_DOWNLOAD=1``."""
    return flag or os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def _from_tag(name: str, tag: str, allow_download: bool = False) -> torch.nn.Module:
    if tag not in open_clip.list_pretrained_tags_by_model(name):
        raise UserError(f"unknown pretrained tag {tag!r} for {name}; known: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}")
    quick_gelu = _quick_gelu(name, tag)
    if downloads_allowed(allow_download):
        return open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu)
    cfg = open_clip.get_pretrained_cfg(name, tag)
    local = cached_tag_file(cfg)
    if local is None:
        hub = cfg.get("hf_hub", "").rstrip("/")
        where = f"the Hugging Face cache (repo {hub})" if hub else f"~/.cache/clip ({cfg.get('url', '?')})"
        raise UserError(f"weights {name}/{tag} are not on this machine and downloads are off; put them in {where}, "
                        "pass --pretrained /path/to/weights.safetensors, or allow the download with "
                        f"--allow-download (or {ALLOW_DOWNLOAD_ENV}=1)")
    return open_clip.create_model(name, pretrained=str(local), force_quick_gelu=quick_gelu)


def cached_tag_file(cfg: dict) -> Path | None:
    """The local file of an open_clip pretrained entry, looked up without any network request, or ``None``.

    Mirrors open_clip's ``download_pretrained``: an explicit ``file``, then the Hugging Face cache entry (the
    ``.safetensors`` twin first), then the URL's file in ``~/.cache/clip``.
    """
    if cfg.get("file"):
        return Path(cfg["file"]) if Path(cfg["file"]).is_file() else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else str(Path(filename).with_suffix(".safetensors"))
        candidates = [safe, filename]
        for candidate in dict.fromkeys(candidates):
            found = try_to_load_from_cache(repo, candidate, cache_dir=_hf_hub_cache())
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    url = cfg.get("url", "")
    if url:
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return path
    return None


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Hold ``huggingface_hub`` in offline mode (every request refused) while ``offline``; its own switch, the
    ``HF_HUB_OFFLINE`` variable, is read only once, when it is first imported."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache as ``huggingface_hub`` resolves it, read from the environment now (its own
    constant is fixed when it is first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")) / "hub"


def _checked_state(state: dict, clip: torch.nn.Module, name: str) -> dict:
    expected = set(clip.state_dict())
    missing = expected - set(state)
    if missing:
        raise UserError(f"the weight file does not fit backbone {name!r} ({len(missing)} tensors missing, "
                        f"e.g. {sorted(missing)[0]}); pass --backbone matching the file")
    return {k: v for k, v in state.items() if k in expected}
