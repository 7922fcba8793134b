"""One ``clbench run``: build the benchmark and backbone once, then run each method over the sequence and
write its results directory (the results contract in :mod:`clbench.results`)."""

from __future__ import annotations

import copy
import dataclasses
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from clbench.config import RunConfig, method_run_config, run_id, train_config_for
from clbench.datasets.base import Benchmark, ImageSpec
from clbench.errors import UserError
from clbench.harness import DivergenceError, Hooks, SequenceResult, resolve_device, run_sequence
from clbench.methods import get_method
from clbench.metrics import mtil_metrics
from clbench.models.backbones import load_backbone
from clbench.models.clip import ClipModel
from clbench.profiling import Profiler
from clbench.results import (
    accuracy_frame,
    atomic_write_csv,
    atomic_write_json,
    environment_info,
    run_dir,
)


@dataclass
class MethodOutcome:
    method: str
    path: Path
    status: str
    metrics: dict | None
    error: str | None = None


def build_benchmark(cfg: RunConfig, spec: ImageSpec) -> Benchmark:
    """The task sequence named by ``cfg.benchmark`` in ``cfg.order``."""
    if cfg.benchmark == "synthetic":
        from clbench.datasets.synthetic import build_synthetic

        return build_synthetic(cfg.order, spec, cfg.data.train_per_class, cfg.data.test_per_class, cfg.seed,
                               num_tasks=cfg.data.num_tasks or None)
    if cfg.benchmark == "mtil":
        try:
            from clbench.datasets.mtil import build_mtil
        except ImportError:
            raise UserError("--benchmark mtil is not available in this version; use --benchmark synthetic") from None
        return build_mtil(cfg, spec)
    if cfg.benchmark == "xtail":
        raise UserError("--benchmark xtail is not implemented yet; use --benchmark synthetic or mtil")
    raise UserError(f"unknown benchmark {cfg.benchmark!r}")


def load_model(cfg: RunConfig, device: torch.device, on_pretrain_step=None) -> ClipModel:
    return load_backbone(cfg.backbone, cfg.pretrained or None, device, on_pretrain_step=on_pretrain_step)


def write_results(path: Path, result: SequenceResult, profiler: Profiler) -> dict:
    names = result.datasets
    trained_on = names[: len(result.rows)]
    atomic_write_csv(path / "zeroshot.csv", accuracy_frame([result.zeroshot], ["zeroshot"], names))
    atomic_write_csv(path / "accuracy.csv", accuracy_frame(result.rows, trained_on, names))
    atomic_write_csv(path / "profile.csv", profiler.frame())
    state = profiler.state_frame()
    if len(state):
        atomic_write_csv(path / "state_bytes.csv", state)
    if len(result.rows) != len(names):
        return {}
    import numpy as np

    metrics = mtil_metrics(np.array(result.rows), names)
    metrics["zeroshot"] = dict(zip(names, result.zeroshot, strict=True))
    atomic_write_json(path / "metrics.json", metrics)
    return metrics


def run_methods(
    cfg: RunConfig,
    methods: list[str],
    out: Path,
    hooks_for: Callable[[str], Hooks] | None = None,
    on_pretrain_step=None,
) -> list[MethodOutcome]:
    """Run every method in ``methods`` on the configured benchmark; one results directory each."""
    device = resolve_device(cfg.device)
    for name in methods:
        get_method(name)
    paths = {m: run_dir(out, cfg.benchmark, cfg.order, m, cfg.seed) for m in methods}
    _check_writable(Path(out))
    torch.manual_seed(cfg.seed)  # random-init backbones (--pretrained none) are seeded too
    base_model = load_model(cfg, device, on_pretrain_step)
    benchmark = build_benchmark(cfg, base_model.image_spec)
    outcomes = []
    for name in methods:
        outcomes.append(_run_one(cfg, name, base_model, benchmark, device, paths[name],
                                 hooks_for(name) if hooks_for else Hooks()))
    return outcomes


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not _can_write(probe):
        raise UserError(f"output folder {out} is not writable; pass --out to a folder you can write")


def _can_write(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


def _run_one(cfg: RunConfig, name: str, base_model: ClipModel, benchmark: Benchmark, device: torch.device,
             path: Path, hooks: Hooks) -> MethodOutcome:
    method_cls = get_method(name)
    hparams = method_cls.Hparams(**cfg.methods[name])
    train = train_config_for(cfg, name)
    resolved = method_run_config(cfg, name)
    resolved["datasets"] = benchmark.task_names
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base_model)
    profiler = Profiler(device=device)
    method = method_cls(model, hparams, profiler)
    method.benchmark = cfg.benchmark
    validate = getattr(method, "validate", None)
    if validate is not None:
        validate()
    path.mkdir(parents=True, exist_ok=True)
    started = time.time()
    manifest = {"status": "running", "run_id": run_id(resolved), "method": name, "seed": cfg.seed,
                "benchmark": cfg.benchmark, "order": cfg.order, "started": started,
                "environment": environment_info(device), "benchmark_info": benchmark.info}
    atomic_write_json(path / "config.json", resolved)
    atomic_write_json(path / "manifest.json", manifest)
    result = None
    try:
        result = run_sequence(method, benchmark, train, profiler, device, cfg.seed, cfg.data.prompt,
                              cfg.precision, hooks)
        metrics = write_results(path, result, profiler)
        manifest.update(status="complete", finished=time.time(), seconds=time.time() - started)
        atomic_write_json(path / "manifest.json", manifest)
        return MethodOutcome(name, path, "complete", metrics)
    except DivergenceError as exc:
        manifest.update(status="failed", error=str(exc), finished=time.time())
        atomic_write_json(path / "manifest.json", manifest)
        return MethodOutcome(name, path, "failed", None, str(exc))
    except BaseException as exc:
        manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time(),
                        traceback=traceback.format_exc())
        atomic_write_json(path / "manifest.json", manifest)
        raise


def config_summary(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
