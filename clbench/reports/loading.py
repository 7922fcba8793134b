"""Find, read and check what a report is made of: run folders (the results contract of
:mod:`clbench.storage.results`) and external accuracy matrices.

Only runs whose ``manifest.json`` says ``complete`` are read; the others are skipped with a warning.
Everything is checked before any output is written, so a bad input ends in one :class:`UserError` line
and never in a partial table: a corrupt ``metrics.json`` or ``accuracy.csv``, a ``metrics.json`` that
disagrees with its own matrix, runs of several benchmarks or orders, or matrices over different task lists.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clbench.config import DEFAULT_EVAL
from clbench.engine.metrics import matrix_from_frame, metrics_from_json, mtil_metrics
from clbench.errors import UserError
from clbench.reports.names import method_display, method_order_key
from clbench.storage.results import group_label, read_accuracy_csv, safe_component
from clbench.storage.safeio import check_path, json_object, read_json, text_stream

RUN = "run here"
EXTERNAL = "external matrix"
REPORTED = "reported (not re-run)"
REFERENCE = "zero-shot reference"  # the zero-shot run: shown on its own line, never ranked

# Config keys that do not change a run's numbers (or are the seed itself): seeds differing only here pool.
IGNORED_CONFIG_KEYS = frozenset({"seed", "device", "data_root", "preset", "datasets", "_doc",
                                 "train.num_workers", "train.eval_batch_size",
                                 # the task list is compared on its own; accepting a partial dataset changes no number
                                 "data.datasets", "data.allow_incomplete"})
# ``recipe`` restates the settings with their provenance (the method's card), so it never tells runs apart.
IGNORED_CONFIG_PREFIXES = ("recipe.",)
METRIC_TOLERANCE = 0.01  # percent; accuracy.csv keeps 4 decimals, so a sound pair agrees far closer


@dataclass
class Matrix:
    """One accuracy matrix: a complete run (``source == RUN``) or an external CSV (``EXTERNAL``)."""

    label: str
    source: str
    path: Path
    seed: int | None
    datasets: list[str]
    accuracy: pd.DataFrame  # index: trained_on, columns: datasets, both in training order (percent)
    metrics: dict
    method: str = ""
    zeroshot: pd.Series | None = None
    profile: pd.DataFrame | None = None
    state: pd.DataFrame | None = None
    config: dict = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)  # classes per dataset, where known (chance level)


@dataclass
class ReportInput:
    """Everything one table is made of: one benchmark/order, one task list, rows grouped by label."""

    benchmark: str | None
    order: int | None
    datasets: list[str]
    matrices: list[Matrix]
    warnings: list[str] = field(default_factory=list)
    eval_rule: str | None = None  # task or union (clbench runs); None for external matrices only
    preset: str | None = None  # the runs' preset (one per table); None for external matrices only

    @property
    def own_rule(self) -> bool:
        """Whether the runs use their benchmark's own evaluation rule (so its published numbers compare)."""
        return self.eval_rule is None or self.eval_rule == DEFAULT_EVAL.get(self.benchmark or "", self.eval_rule)

    def groups(self) -> dict[str, list[Matrix]]:
        """Matrices by row label, seeds sorted within a row. Rows in a fixed order: runs before external
        matrices; runs by :data:`~clbench.reports.names.METHOD_ORDER` (zero-shot first), then by label;
        external matrices in the order given."""
        out: dict[str, list[Matrix]] = {}
        for m in self.matrices:
            out.setdefault(m.label, []).append(m)
        first = {label: i for i, label in enumerate(out)}

        def key(label: str) -> tuple:
            m = out[label][0]
            if m.source != RUN:
                return (1, (0, ""), first[label], label)
            return (0, method_order_key(m.method), 0, label)

        return {k: sorted(out[k], key=lambda m: -1 if m.seed is None else m.seed) for k in sorted(out, key=key)}


def collect(paths: list[Path], labels: list[str] | None = None) -> ReportInput:
    """Read every run below the folders in ``paths`` and every CSV in ``paths``; check they form one table."""
    if not paths:
        raise UserError("no input: give results folders and/or accuracy CSVs, e.g. clbench report results/")
    warnings: list[str] = []
    runs: list[Matrix] = []
    csvs: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        path = check_path(path, "report input")
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise UserError(f"{path} is neither a results folder nor a .csv accuracy matrix")
            csvs.append(path)
            continue
        if not path.is_dir():
            what = "is not a regular file or a folder" if path.exists() else "does not exist"
            raise UserError(f"{path} {what}; give a results folder (clbench run --out) or an accuracy CSV")
        manifests = sorted(path.rglob("manifest.json"))
        if not manifests:
            raise UserError(f"no runs in {path}: no manifest.json below it; pass the folder 'clbench run' wrote")
        for manifest_path in manifests:
            folder = manifest_path.parent.resolve()
            if folder in seen:
                continue
            seen.add(folder)
            manifest = _read_json(manifest_path)
            status = manifest.get("status") if isinstance(manifest, dict) else None
            if status != "complete":
                warnings.append(f"skipping {manifest_path.parent}: status {status!r}, not complete")
                continue
            runs.append(read_run(manifest_path.parent, manifest))
    labels = list(labels or [])
    if len(labels) > len(csvs):
        raise UserError(f"{len(labels)} --label value(s) for {len(csvs)} accuracy CSV(s); "
                        "give at most one --label per CSV, in the order of the CSVs")
    externals = [read_external(p, labels[i] if i < len(labels) else p.stem) for i, p in enumerate(csvs)]
    if not runs and not externals:
        skipped = f" ({len(warnings)} not complete)" if warnings else ""
        raise UserError(f"no complete runs in {', '.join(str(p) for p in paths)}{skipped}; "
                        "finish or rerun them with clbench run")
    benchmark, order, eval_rule = _single_group(runs)
    preset = _single_setup(runs)
    _label_runs(runs)
    matrices = runs + externals
    datasets = _single_task_list(matrices)
    _check_unique(matrices)
    if benchmark is None:
        benchmark, order = infer_mtil_order(datasets)
    return ReportInput(benchmark, order, datasets, matrices, warnings, eval_rule, preset)


def read_run(folder: Path, manifest: dict) -> Matrix:
    """One complete run folder, every file checked; ``metrics.json`` must agree with ``accuracy.csv``."""
    accuracy_path = folder / "accuracy.csv"
    if not accuracy_path.exists():
        raise UserError(f"{folder}: complete run without accuracy.csv; rerun it or remove the folder")
    accuracy = _square_matrix(read_accuracy_csv(accuracy_path), accuracy_path)
    metrics_path = folder / "metrics.json"
    if not metrics_path.exists():
        raise UserError(f"{folder}: complete run without metrics.json; rerun it or remove the folder")
    metrics = _read_json(metrics_path)
    _check_metrics(metrics, accuracy, metrics_path)
    metrics = metrics_from_json(metrics)
    zeroshot = None
    if (folder / "zeroshot.csv").exists():
        frame = read_accuracy_csv(folder / "zeroshot.csv")
        missing = [d for d in accuracy.columns if d not in frame.columns]
        if len(frame) != 1 or missing:
            raise UserError(f"{folder / 'zeroshot.csv'} needs one row with a column per dataset of accuracy.csv")
        zeroshot = frame.iloc[0][list(accuracy.columns)].astype(float)
    config = _read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    benchmark = _field(manifest, config, "benchmark", str, folder)
    if benchmark is not None:
        safe_component(benchmark, f"{folder / 'manifest.json'}: benchmark")  # it names the report's files
    evaluation = manifest.get("evaluation", {})
    rule = (evaluation.get("rule") if isinstance(evaluation, dict) else None) or config.get("eval") \
        or DEFAULT_EVAL.get(benchmark, "task")
    if rule not in ("task", "union"):
        raise UserError(f"{folder}: evaluation rule {rule!r} is neither 'task' nor 'union'; rerun that run or "
                        "remove its folder")
    method = _field(manifest, config, "method", str, folder) or folder.parent.name
    seed = _field(manifest, config, "seed", int, folder)
    order = _field(manifest, config, "order", int, folder)
    classes = manifest.get("classes") if isinstance(manifest.get("classes"), dict) else known_classes(benchmark)
    return Matrix(label=method, source=RUN, path=folder, seed=seed,
                  datasets=list(accuracy.columns), accuracy=accuracy, metrics=metrics, method=method,
                  zeroshot=zeroshot, profile=_optional_csv(folder / "profile.csv", PROFILE_COLUMNS),
                  state=_optional_csv(folder / "state_bytes.csv", STATE_COLUMNS),
                  config={**config, "benchmark": benchmark, "order": order, "eval": rule},
                  classes={str(k): int(v) for k, v in classes.items() if isinstance(v, int) and v > 0})


def _field(manifest: dict, config: dict, key: str, kind: type, folder: Path):
    """``manifest[key]`` (else ``config[key]``, else None), which must be of ``kind`` (a bool is no int)."""
    value = manifest.get(key, config.get(key))
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value.strip()):
        raise UserError(f"{folder}: {key} is {value!r} in its manifest.json/config.json, not a valid "
                        f"{'text' if kind is str else 'integer'}; rerun that run or remove its folder")
    return value


def known_classes(benchmark: str | None) -> dict[str, int]:
    """Class counts of the real benchmarks' datasets, for runs whose manifest predates recording them."""
    if benchmark == "mtil":
        from clbench.datasets.mtil_names import EXPECTED_CLASSES
    elif benchmark == "xtail":
        from clbench.datasets.xtail_names import EXPECTED_CLASSES
    else:
        return {}
    return dict(EXPECTED_CLASSES)


def read_external(path: Path, label: str) -> Matrix:
    """An accuracy matrix produced elsewhere, in the ``accuracy.csv`` format; metrics computed here."""
    accuracy = _square_matrix(read_accuracy_csv(path), path)
    metrics = mtil_metrics(accuracy.to_numpy(), list(accuracy.columns))
    return Matrix(label=label, source=EXTERNAL, path=path, seed=None, datasets=list(accuracy.columns),
                  accuracy=accuracy, metrics=metrics, method=label)


PROFILE_COLUMNS = ("task", "section", "seconds", "peak_bytes")
STATE_COLUMNS = ("task", "name", "bytes")


def _optional_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame | None:
    if not path.exists():
        return None
    fix = "rerun the run or remove the file"
    try:
        frame = pd.read_csv(text_stream(path, "run file", fix))
    except (OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"cannot read {path}: {detail}; {fix}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; rerun the run or remove the file")
    return frame


@dataclass(frozen=True)
class SettingReport:
    """How ``clbench report`` tables the runs of a setting other than CLIP's: its name in messages, and
    ``build(paths, fmt, figures, costs, layout) -> Report``."""

    title: str
    build: Callable[..., Any]


# Filled by each setting's report module when it is imported (clbench.settings.mcit.report registers "mcit"; the report
# command imports it), so that reports never import a setting.
SETTING_REPORTS: dict[str, SettingReport] = {}


def register_setting_report(setting: str, title: str, build: Callable[..., Any]) -> None:
    """Declare the report of runs whose ``manifest.json`` says ``"setting": setting``."""
    SETTING_REPORTS[setting] = SettingReport(title, build)


def input_setting(paths: list[Path]) -> str | None:
    """The setting of every run below ``paths`` (a manifest's ``setting``), ``None`` when all are CLIP runs; a mix
    (or runs of another setting beside accuracy CSVs, which are read as CLIP matrices) is a one-line error."""
    other: dict[str, list[Path]] = {}
    clip, csvs = [], []
    for path in paths:
        path = check_path(path, "report input")
        if path.is_file():
            csvs.append(path)
            continue
        if not path.is_dir():
            continue  # the CLIP reader words the error for a missing path
        for manifest in sorted(path.rglob("manifest.json")):
            setting = _read_json(manifest).get("setting")
            if isinstance(setting, str) and setting != "clip":
                other.setdefault(setting, []).append(manifest.parent)
            else:
                clip.append(manifest.parent)
    if not other:
        return None
    (setting, runs), *rest = other.items()
    title = SETTING_REPORTS[setting].title if setting in SETTING_REPORTS else setting
    if rest:
        raise UserError(f"the inputs mix {title} runs, e.g. {runs[0]}, and {rest[0][0]} runs, e.g. {rest[0][1][0]}; "
                        "report each setting apart")
    if clip:
        raise UserError(f"the inputs mix {title} runs, e.g. {runs[0]}, and CLIP runs, e.g. {clip[0]}; their "
                        "metrics differ, so report each setting apart")
    if csvs:
        raise UserError(f"{csvs[0]}: accuracy CSVs are read as CLIP (MTIL) matrices and cannot join {title} runs; "
                        f"report them apart, or score a matrix with clbench metrics --setting {setting}")
    return setting


def _read_json(path: Path) -> dict:
    """A run's JSON file (manifest, config, metrics): a regular file of bounded size holding a JSON object."""
    fix = "rerun that run or remove its folder"
    return json_object(read_json(path, "run file", fix), path, "run file", fix)


def _square_matrix(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``accuracy.csv`` as a T x T frame indexed by ``trained_on``; empty cells and stray rows are errors."""
    try:
        values, order = matrix_from_frame(frame, str(path))
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a usable accuracy matrix ({exc})") from None
    if not np.isfinite(values).all():
        raise UserError(f"{path} has empty or non-finite cells; every trained task needs an accuracy on every "
                        "trained dataset")
    return pd.DataFrame(values, index=pd.Index(order, name="trained_on"), columns=order)


def _check_metrics(metrics, accuracy: pd.DataFrame, path: Path) -> None:
    """``metrics.json`` must have the contract's keys and equal what its own accuracy matrix gives."""
    expected = mtil_metrics(accuracy.to_numpy(), list(accuracy.columns))
    try:
        pairs = [(k, metrics[k], expected[k]) for k in ("transfer", "average", "last")]
        for block in ("transfer", "average", "last"):
            got = metrics["per_dataset"][block]
            if set(got) != set(expected["per_dataset"][block]):
                raise KeyError(f"per_dataset.{block}")
            pairs += [(f"{block} on {d}", got[d], v) for d, v in expected["per_dataset"][block].items()]
        for key, got, want in pairs:
            got = float("nan") if got is None else float(got)  # null: an undefined metric (a one-task Transfer)
            if not (math.isnan(got) and math.isnan(want)) and not abs(got - want) <= METRIC_TOLERANCE:
                raise UserError(f"{path} disagrees with its accuracy.csv ({key}: {got:.2f} vs {want:.2f}); "
                                "the run's files are inconsistent, rerun it or remove its folder")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} is corrupt (bad or missing {exc}); rerun that run or remove its folder") from None


def _single_group(runs: list[Matrix]) -> tuple[str | None, int | None, str | None]:
    """The one (benchmark, order, evaluation rule) of ``runs``; a mix is a one-line error."""
    groups: dict[tuple, int] = defaultdict(int)
    for m in runs:
        groups[(m.config.get("benchmark"), m.config.get("order"), m.config.get("eval"))] += 1
    if len(groups) > 1:
        def folder(b, o, e) -> str:
            return f"{group_label(b, e)}-order{o}"

        names = ", ".join(f"{folder(*key)} ({n} run{'s' if n != 1 else ''})"
                          for key, n in sorted(groups.items(), key=str))
        first = next(iter(sorted(groups, key=str)))
        raise UserError(f"the runs mix benchmarks/orders/evaluation rules: {names}; one table holds one, so report "
                        f"each apart, e.g. clbench report <results>/{folder(*first)}")
    if not groups:
        return None, None, None
    benchmark, order, rule = next(iter(groups))
    return (None if benchmark is None else str(benchmark)), (None if order is None else int(order)), rule


def _single_task_list(matrices: list[Matrix]) -> list[str]:
    first = matrices[0]
    for m in matrices[1:]:
        if m.datasets != first.datasets:
            raise UserError(f"{m.path} trains {', '.join(m.datasets)} but {first.path} trains "
                            f"{', '.join(first.datasets)}; one table needs one task list in one order, "
                            "so report them apart")
    return first.datasets


def _flatten(data, prefix: str = "") -> dict[str, object]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, object] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _signature(m: Matrix) -> dict[str, str]:
    flat = _flatten(m.config)
    return {k: json.dumps(v, sort_keys=True) for k, v in flat.items()
            if k not in IGNORED_CONFIG_KEYS and not k.startswith(IGNORED_CONFIG_PREFIXES)}


def _setup_signature(m: Matrix) -> dict[str, str]:
    """What every method of one table must share: the config beyond the method, its hyperparameters, its own
    training recipe (presets tune ``train`` per method) and the seed; the preset's name counts too."""
    sig = {k: v for k, v in _signature(m).items() if not k.startswith(("hparams.", "train.")) and k != "method"}
    sig["preset"] = json.dumps(m.config.get("preset"))
    return sig


def _single_setup(runs: list[Matrix]) -> str | None:
    """The runs' one preset. Runs of several methods made under different settings (another preset, other data
    settings, another backbone...) are refused: one table compares methods under one setup."""
    if not runs:
        return None
    sigs = [_setup_signature(m) for m in runs]
    keys = sorted({k for s in sigs for k in s} - {k for k in sigs[0] if all(s.get(k) == sigs[0][k] for s in sigs)})
    if keys and len({m.method for m in runs}) > 1:
        def values(key: str) -> str:
            seen = dict.fromkeys(json.loads(s[key]) if key in s else "-" for s in sigs)
            return f"{key} {' vs '.join(str(v) for v in seen)}"

        same = [m.path for m, s in zip(runs, sigs, strict=True) if all(s.get(k) == sigs[0].get(k) for k in keys)]
        common = Path(os.path.commonpath([str(p) for p in same]))
        others = [m.path for m in runs if m.path not in same]
        example = (str(common) if not any(common in p.parents or p == common for p in others)
                   else " ".join(str(p) for p in same[:3]) + (" ..." if len(same) > 3 else ""))
        raise UserError(f"the runs were made with different settings ({'; '.join(values(k) for k in keys[:4])}"
                        f"{'; ...' if len(keys) > 4 else ''}), so their numbers do not compare; report each setting "
                        f"apart, e.g. clbench report {example}")
    preset = runs[0].config.get("preset")
    return None if preset is None or keys else str(preset)


def _label_runs(runs: list[Matrix]) -> None:
    """Label = the method's display name; runs of one method with different settings become separate rows
    labelled by the settings that differ (never pooled as if they were seeds)."""
    by_method: dict[str, list[Matrix]] = defaultdict(list)
    for m in runs:
        by_method[m.method].append(m)
    for method, items in by_method.items():
        sigs = [_signature(m) for m in items]
        keys = sorted({k for s in sigs for k in s} - {k for k in sigs[0] if all(s.get(k) == sigs[0][k] for s in sigs)})
        for m, sig in zip(items, sigs, strict=True):
            suffix = ", ".join(f"{k.removeprefix('hparams.')}={json.loads(sig[k]) if k in sig else '-'}"
                               for k in keys)
            m.label = method_display(method) + (f" ({suffix})" if suffix else "")


def _check_unique(matrices: list[Matrix]) -> None:
    seen: dict[tuple[str, int | None], Matrix] = {}
    sources: dict[str, str] = {}
    for m in matrices:
        if sources.setdefault(m.label, m.source) != m.source or (m.source == EXTERNAL and (m.label, None) in seen):
            raise UserError(f"row label {m.label!r} is used twice ({m.path}); give distinct --label values")
        key = (m.label, m.seed)
        if key in seen:
            raise UserError(f"two complete runs of {m.label} seed {m.seed} with the same settings: {seen[key].path} "
                            f"and {m.path}; pass only one of them")
        seen[key] = m


# The two MTIL task orders (ZSCL, Zheng et al. ICCV 2023, and its code), by normalised dataset name, for external-only
# tables.
MTIL_ORDERS = {
    1: ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxfordpet",
        "stanfordcars", "sun397"],
    2: ["stanfordcars", "food", "mnist", "oxfordpet", "flowers", "sun397", "aircraft", "caltech101", "dtd",
        "eurosat", "cifar100"],
}


def infer_mtil_order(datasets: list[str]) -> tuple[str | None, int | None]:
    """``("mtil", k)`` when ``datasets`` is MTIL Order k by name, else ``(None, None)``."""
    from clbench.reports.names import normalise

    keys = [normalise(d) for d in datasets]
    for order, names in MTIL_ORDERS.items():
        if keys == names:
            return "mtil", order
    return None, None
