"""Typed run configuration, presets (small JSON files) and ``--set key=value`` overrides.

A run's configuration is resolved in this order: dataclass defaults, the preset's values, the command
line's options, then ``--set`` overrides. ``--set`` addresses any value by dotted path: ``train.lr=5e-4``,
``data.train_per_class=32``, or a method's hyperparameter under its registry name (``lora.rank=8``).
Values are parsed by the field's type and checked against its range; mistakes are one-line
:class:`~clbench.errors.UserError`s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clbench.datasets import BENCHMARKS
from clbench.errors import UserError
from clbench.ranges import check_range  # also clbench.config.check_range, as before

if TYPE_CHECKING:
    from clbench.methods.recipes import RecipeRow

PRESET_DIR = Path(__file__).parent / "presets"
# The evaluation rule of each benchmark when --eval is not given: ``task`` classifies a test image among its own
# dataset's classes (MTIL: task identity known), ``union`` among every dataset's classes (X-TAIL).
SEED_MAX = 2**32 - 1
INT_LIMIT = 2**63 - 1
DEFAULT_EVAL = {"synthetic": "task", "mtil": "task", "xtail": "union"}


@dataclass
class TrainConfig:
    epochs: list[int] = field(default_factory=lambda: [3], metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"min": 0.0, "exclusive_min": True})
    weight_decay: float = field(default=0.01, metadata={"min": 0.0})
    # adamw (KeepLoRA, LoRA, ZSCL); adam = Adam with L2 weight decay (InfLoRA's code); sgd = SGD with
    # ``momentum`` (LoDA's code). ``momentum`` is used by sgd only.
    optimizer: str = field(default="adamw", metadata={"choices": ("adamw", "adam", "sgd")})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    # onecycle (KeepLoRA, LoRA); cosine = linear warm-up over warmup_steps then cosine decay (ZSCL; LoDA without
    # warm-up); coda_cosine = CODA-Prompt's quarter cosine (InfLoRA's code with Adam)
    schedule: str = field(default="onecycle", metadata={"choices": ("onecycle", "constant", "cosine", "coda_cosine")})
    warmup_steps: int = field(default=0, metadata={"min": 0})
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    max_steps: int = field(default=0, metadata={"min": 0})
    eval_batch_size: int = field(default=256, metadata={"min": 1})
    num_workers: int = field(default=0, metadata={"min": 0})

    def epochs_for(self, task_index: int) -> int:
        """Epochs of task ``task_index``: one value for all tasks, or a per-task list (cycled)."""
        return self.epochs[task_index % len(self.epochs)]


@dataclass
class DataConfig:
    train_per_class: int = field(default=64, metadata={"min": 1})
    test_per_class: int = field(default=32, metadata={"min": 1})
    num_tasks: int = field(default=0, metadata={"min": 0})
    prompt: str = field(default="first", metadata={"choices": ("first", "ensemble")})
    shots: int = field(default=0, metadata={"min": 0})
    # the embedded benchmark's images (train and test) are a pure function of this seed, not of --seed, so the test
    # set is the same for every training seed
    seed: int = field(default=0, metadata={"min": 0})
    # MTIL only: ZSCL's RandomResizedCrop(scale 0.9-1) on training images, and skipping unreadable images.
    train_augment: bool = False
    skip_bad_images: bool = False
    # MTIL / X-TAIL: the datasets to learn, comma-separated in their run order (``--datasets mnist,eurosat``; the
    # protocol's names, any case; stored canonical); "" = the order's sequence (:mod:`clbench.datasets.sequence`)
    datasets: str = ""
    # accept a dataset whose class count differs from the protocol's (``--allow-incomplete``); both are recorded
    allow_incomplete: bool = False


@dataclass
class RunConfig:
    benchmark: str = field(default="synthetic", metadata={"choices": BENCHMARKS})
    order: int = field(default=1, metadata={"choices": (1, 2)})
    # NumPy and the loader seeds take 32-bit seeds; a larger one would fail mid-run (or overflow a path name)
    seed: int = field(default=0, metadata={"min": 0, "max": SEED_MAX})
    backbone: str = "tiny"
    pretrained: str = ""
    data_root: str = ""
    device: str = "auto"
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "amp")})
    # "" = the benchmark's own rule (DEFAULT_EVAL); resolved by build_config
    eval: str = field(default="", metadata={"choices": ("task", "union")})
    preset: str = "default"
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method_train: dict[str, dict] = field(default_factory=dict)
    methods: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def list_presets(setting: str = "") -> list[str]:
    """The presets of the CLIP setting (``clbench/presets/*.json``), or of another setting (its folder there:
    ``clbench/presets/mcit/*.json``)."""
    return sorted(p.stem for p in (PRESET_DIR / setting).glob("*.json"))


def load_preset(name: str, setting: str = "", owner: str = "") -> dict:
    """The preset ``name`` of ``setting`` (see :func:`list_presets`), as its JSON says; an unknown name is one line
    (``owner`` names the setting in it)."""
    path = PRESET_DIR / setting / f"{name}.json"
    if name not in list_presets(setting):
        if owner:
            raise UserError(f"--preset {name!r} is unknown for the {owner}; use {' or '.join(list_presets(setting))}")
        raise UserError(f"unknown preset {name!r}; available: {', '.join(list_presets(setting))}")
    return json.loads(path.read_text())


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def parse_value(raw: Any, tp: Any, path: str) -> Any:
    """Parse ``raw`` (a string from the command line, or a JSON value) as type ``tp``."""
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    try:
        if origin is list:
            (inner,) = typing.get_args(tp)
            items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x.strip()]
            if not items:
                raise ValueError("empty list")
            return [parse_value(x, inner, path) for x in items]
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = int(str(raw).strip()) if isinstance(raw, str) else int(raw)
            if abs(value) > INT_LIMIT:  # no setting needs more; torch and NumPy overflow beyond 64 bits
                raise UserError(f"{_where(path)}: {raw!r} is too large; give an integer below 2**63")
            return value
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = float(raw)
            if not math.isfinite(value):  # nan, inf, or a literal beyond float range such as 1e309
                raise UserError(f"{_where(path)}: {raw!r} is not a finite number; give a finite value")
            return value
        if tp is str:
            return str(raw)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise UserError(f"{_where(path)}: {raw!r} is not a valid {name}") from None
    raise UserError(f"--set {path}: values of type {tp} cannot be set from the command line")


def _where(path: str) -> str:
    """``--set key`` for a dotted key; an option (``--seed``) or a preset's entry as it is."""
    return path if path.startswith(("-", "preset ")) else f"--set {path}"


def set_field(obj: Any, keys: list[str], raw: Any, path: str) -> None:
    """Set ``obj.<keys>`` (dataclasses all the way down) from ``raw``, typed and range-checked."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    key = keys[0]
    if key not in fields or key in ("methods", "method_train"):
        known = ", ".join(sorted(k for k in fields if k not in ("methods", "method_train")))
        raise UserError(f"--set {path}: unknown key {key!r}; known here: {known}")
    f = fields[key]
    hints = typing.get_type_hints(type(obj))
    if len(keys) > 1:
        child = getattr(obj, key)
        if not dataclasses.is_dataclass(child):
            raise UserError(f"--set {path}: {key!r} has no sub-keys")
        set_field(child, keys[1:], raw, path)
        return
    if dataclasses.is_dataclass(getattr(obj, key)):
        raise UserError(f"--set {path}: {key!r} is a group; set one of its keys, e.g. {path}.<key>=...")
    if f.metadata.get("nullable") and isinstance(raw, str) and raw.strip().lower() == "none":
        setattr(obj, key, None)  # a field whose None means "off" (e.g. no caption truncation)
        return
    value = parse_value(raw, hints[key], path)
    check_range(value, f.metadata, path)
    setattr(obj, key, value)


def parse_assignments(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set lora.rank=8")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value.strip()))
    return pairs


def method_hparams(method_cls: type, overrides: dict[str, Any], name: str) -> Any:
    """Build a method's typed hyperparameters from its defaults plus ``overrides`` (dotted keys)."""
    hparams = method_cls.Hparams()
    for key, raw in overrides.items():
        try:
            set_field(hparams, key.split("."), raw, f"{name}.{key}")
        except UserError as exc:
            raise UserError(str(exc).replace(f"--set {name}.{key}: unknown key", f"--set {name}.{key}: "
                                             f"{name} has no hyperparameter")) from None
    return hparams


def build_config(preset: str, options: dict[str, Any], assignments: list[str], method_names: list[str],
                 data_options: dict[str, Any] | None = None) -> RunConfig:
    """Resolve defaults → preset → options → ``--set``; method hyperparameters go under ``methods``.

    ``data_options`` are command-line options that set ``data.<key>`` (``--shots``, ``--skip-bad-images``);
    ``None`` values are left as the preset has them.
    """
    from clbench.methods import get_method

    cfg = RunConfig(preset=preset)
    data = load_preset(preset)
    method_overrides: dict[str, dict[str, Any]] = {m: {} for m in method_names}
    for section in ("train", "data"):
        for key, raw in data.get(section, {}).items():
            set_field(cfg, [section, key], raw, f"preset {preset}: {section}.{key}")
    for key, raw in data.get("run", {}).items():
        set_field(cfg, [key], raw, f"preset {preset}: {key}")
    for key, raw in options.items():
        if raw is not None:
            set_field(cfg, [key], raw, f"--{key.replace('_', '-')}")
    for key, raw in (data_options or {}).items():
        if raw is not None:
            set_field(cfg, ["data", key], raw, f"--{key.replace('_', '-')}")
    by_order = data.get("by_order", {}).get(str(cfg.order), {})
    for key, raw in by_order.get("train", {}).items():
        set_field(cfg, ["train", key], raw, f"preset {preset} (order {cfg.order}): train.{key}")
    for name in method_names:
        cfg.method_train[name] = dict(data.get("method_train", {}).get(name, {}))
        cfg.method_train[name].update(by_order.get("method_train", {}).get(name, {}))
        method_overrides[name].update(data.get("methods", {}).get(name, {}))
    for key, raw in parse_assignments(assignments):
        head, _, rest = key.partition(".")
        if head in method_names or _is_method(head):
            if head not in method_names:
                raise UserError(f"--set {key}: method {head!r} is not in --methods; add it or drop the setting")
            if not rest:
                raise UserError(f"--set {key}: name a hyperparameter, e.g. --set {head}.rank=8")
            if rest.startswith("train."):
                probe = TrainConfig()
                set_field(probe, rest.split(".")[1:], raw, key)
                cfg.method_train[head][rest.split(".", 1)[1]] = raw
            else:
                method_overrides[head][rest] = raw
        else:
            set_field(cfg, key.split("."), raw, key)
    for name in method_names:
        hp = method_hparams(get_method(name), method_overrides[name], name)
        cfg.methods[name] = dataclasses.asdict(hp)
        check_train_config(train_config_for(cfg, name), name)
    if not cfg.eval:
        cfg.eval = DEFAULT_EVAL[cfg.benchmark]
    check_real_data_options(cfg.benchmark, cfg.data.shots, cfg.data.skip_bad_images, cfg.data_root or "")
    check_selection(cfg)
    return cfg


def check_selection(cfg: RunConfig) -> None:
    """Resolve ``data.datasets`` to the protocol's names (unknown names are one line); it and ``data.num_tasks``
    both choose the tasks, so only one may be given."""
    if cfg.benchmark == "synthetic" and cfg.data.allow_incomplete:
        raise UserError("--allow-incomplete is for real datasets; the synthetic benchmark has no class count to "
                        "check (drop it, or pass --benchmark mtil)")
    if not cfg.data.datasets.strip():
        cfg.data.datasets = ""
        return
    from clbench.datasets.sequence import canonical_selection

    cfg.data.datasets = canonical_selection(cfg.benchmark, cfg.data.datasets)
    if cfg.data.num_tasks:
        raise UserError(f"--datasets and data.num_tasks={cfg.data.num_tasks} both choose the tasks; keep one "
                        f"(e.g. --datasets {cfg.data.datasets})")


def check_real_data_options(benchmark: str, shots: int | None, skip_bad_images: bool, data_root: str = "") -> None:
    """Refuse ``--shots`` / ``--skip-bad-images`` / ``--data-root`` on the synthetic benchmark: they only mean
    something for real datasets, and ignoring them would hide the mistake."""
    if benchmark == "synthetic" and data_root:
        raise UserError("--data-root is for real datasets; the synthetic benchmark is embedded (drop --data-root, or "
                        "pass --benchmark mtil)")
    if benchmark == "synthetic" and (shots or skip_bad_images):
        flag = "--shots" if shots else "--skip-bad-images"
        raise UserError(f"{flag} is for real datasets; the synthetic benchmark is drawn in memory (set its size "
                        "with --set data.train_per_class=K, or pass --benchmark mtil)")


def _is_method(name: str) -> bool:
    from clbench.methods import list_methods

    return name in list_methods()


def train_config_for(cfg: RunConfig, method: str) -> TrainConfig:
    """The training settings of one method: the run's, with that method's preset/--set overrides."""
    train = dataclasses.replace(cfg.train)
    for key, raw in cfg.method_train.get(method, {}).items():
        set_field(train, key.split("."), raw, f"{method}.train.{key}")
    return train


def check_train_config(train: TrainConfig, method: str) -> None:
    """Settings that only mean something together: a warm-up needs the schedule that has one."""
    if train.warmup_steps and train.schedule != "cosine":
        raise UserError(f"{method}: train.warmup_steps={train.warmup_steps} has no effect with schedule "
                        f"{train.schedule!r}; add --set train.schedule=cosine (or {method}.train.schedule=cosine), "
                        "or drop the warm-up")


def method_run_config(cfg: RunConfig, method: str) -> dict:
    """The fully resolved configuration of one (method, order, seed) run."""
    data = cfg.to_dict()
    data.pop("methods")
    data.pop("method_train")
    data["method"] = method
    data["hparams"] = cfg.methods[method]
    data["train"] = dataclasses.asdict(train_config_for(cfg, method))
    data["recipe"] = recipe_record(cfg, method)  # the preset and method card the run followed
    return data


# Data settings added after runs were made: left out of the id at their default, so those runs keep their ids.
OPTIONAL_DATA_KEYS = {"datasets": "", "allow_incomplete": False}


def run_id(run_config: dict) -> str:
    """A deterministic id from the resolved config (sweeps skip finished ids, resume checks them); the recipe
    record is left out: it restates the settings with their provenance. The settings of
    :data:`OPTIONAL_DATA_KEYS` count only when set."""
    config = {k: v for k, v in run_config.items() if k not in ("device", "recipe")}
    if isinstance(config.get("data"), dict):
        config["data"] = {k: v for k, v in config["data"].items()
                          if not (k in OPTIONAL_DATA_KEYS and v == OPTIONAL_DATA_KEYS[k])}
    blob = json.dumps(config, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Recipe cards (clbench.methods.recipes) read against a resolved configuration: here, in the configuration layer,
# so that methods declare their cards without importing it.
def setting_value(cfg: RunConfig, method: str, key: str) -> Any:
    """The resolved value of ``train.<key>`` or of hyperparameter ``key`` for ``method`` in ``cfg`` (a hyperparameter
    that ``cfg`` leaves out has its default)."""
    from clbench.methods import get_method
    from clbench.methods.recipes import TRAIN_FALLBACK

    if key.startswith("train."):
        name = key.removeprefix("train.")
        return getattr(train_config_for(cfg, method), name, TRAIN_FALLBACK.get(name))
    hparams = cfg.methods.get(method, {})
    return hparams[key] if key in hparams else getattr(get_method(method).Hparams(), key)


def recipe_rows(cfg: RunConfig, method: str) -> list[RecipeRow]:
    """Every setting the card of ``method`` declares, with its value in ``cfg`` and its provenance
    (:class:`clbench.methods.recipes.RecipeRow` each)."""
    from clbench.methods.recipes import RecipeRow, card_for

    card = card_for(method)
    if card is None:
        return []
    options = {"order": cfg.order, "benchmark": cfg.benchmark}
    authors = build_config(card.preset, options, [], [method])
    preset = authors if cfg.preset == card.preset else build_config(cfg.preset, options, [], [method])
    rows = []
    for key, source in card.settings.items():
        value = setting_value(cfg, method, key)
        theirs = setting_value(authors, method, key)
        if value == theirs:
            rows.append(RecipeRow(key, value, source.kind, source.note))
        elif value == setting_value(preset, method, key):
            rows.append(RecipeRow(key, value, f"preset {cfg.preset}", f"the {card.preset} preset has {theirs}"))
        else:
            rows.append(RecipeRow(key, value, "--set", f"the {card.preset} preset has {theirs}"))
    return rows


def recipe_record(cfg: RunConfig, method: str) -> dict:
    """What ``config.json`` records about the recipe a run used: its preset, the card it follows and each
    declared setting's value and provenance."""
    from clbench.methods.recipes import card_for

    card = card_for(method)
    if card is None:
        return {"preset": cfg.preset, "card": None}
    return {"preset": cfg.preset, "card": card.reference, "authors_preset": card.preset,
            "settings": {row.key: {"value": row.value, "source": row.source, "note": row.note}
                         for row in recipe_rows(cfg, method)}}


def data_assignments(shots: int | None, skip_bad_images: bool, datasets: str = "",
                     allow_incomplete: bool = False) -> list[str]:
    """``--shots``, ``--skip-bad-images``, ``--datasets`` and ``--allow-incomplete`` as the ``data.*`` settings
    they stand for (``--set`` form)."""
    return ([f"data.shots={shots}"] if shots is not None else []) + (
        ["data.skip_bad_images=true"] if skip_bad_images else []) + (
        [f"data.datasets={datasets}"] if datasets.strip() else []) + (
        ["data.allow_incomplete=true"] if allow_incomplete else [])
