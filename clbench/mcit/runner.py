"""``clbench run`` on an MCIT benchmark: backbone, tasks, methods, the loop, and one results folder per method.

A results folder holds ``accuracy.csv`` (the full T x T matrix, rows = after task, columns = task), ``base.csv``
(the base model's scores), ``metrics.json`` (MFT / MFN / MAA / BWT / Transfer, caption details, losses),
``profile.csv`` (cost sections per task), and ``manifest.json`` (resolved config, seeds, data-file SHA-256,
backbone, package versions, git revision, device).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from clbench.errors import UserError
from clbench.mcit.bench import MCIT_BENCHMARKS, real_tasks, synthetic_tasks
from clbench.mcit.codec import VICUNA_SYSTEM, Codec
from clbench.mcit.loop import LoopConfig, run_sequence
from clbench.mcit.methods import get_mcit_method
from clbench.mcit.metrics import mcit_metrics
from clbench.profiling import Profiler
from clbench.results import (
    accuracy_frame,
    atomic_write_csv,
    atomic_write_json,
    environment_info,
    git_revision,
    run_dir,
)

PRESETS = {
    "smoke": {"n_train": 32, "n_test": 8, "pretrain_steps": 20, "loop": {"epochs": [1], "batch_size": 16}},
    "default": {"n_train": 192, "n_test": 48, "pretrain_steps": 1000, "loop": {"epochs": [3], "batch_size": 16}},
}


@dataclass
class McitOutcome:
    method: str
    path: Path
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def _convert(raw: str, like):
    if isinstance(like, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(like, list):
        return [int(x) for x in raw.split(",")]
    if like is None:
        return None if raw.lower() == "none" else int(raw)
    return type(like)(raw)


def apply_sets(sets: list[str], loop: LoopConfig, hparams: dict[str, object], data_sizes: dict) -> None:
    """``loop.<field>=v``, ``data.n_train=v`` / ``data.n_test=v`` and ``<method>.<field>=v`` overrides."""
    for item in sets:
        key, sep, raw = item.partition("=")
        scope, _, name = key.partition(".")
        target = loop if scope == "loop" else hparams.get(scope)
        if scope == "data" and name in data_sizes and sep:
            data_sizes[name] = int(raw)
            continue
        if not sep or target is None or not hasattr(target, name):
            raise UserError(f"--set {item!r}: the MCIT setting knows loop.<field>, data.n_train, data.n_test and "
                            f"<method>.<field> for the methods run ({', '.join(hparams)})")
        try:
            setattr(target, name, _convert(raw, getattr(target, name)))
        except ValueError:
            raise UserError(f"--set {item!r}: {raw!r} is not a valid value for {key}") from None


def _backbone(backbone: str, steps: int, notify: Callable[[str], None]):
    from clbench.mcit.backbone import load_llava_checkpoint

    if backbone == "tiny":
        from clbench.mcit.pretrain import ensure_tiny_llava, tiny_llava_path

        if not tiny_llava_path(steps).exists():
            notify(f"pre-training the tiny LLaVA ({steps} steps, cached afterwards)")
        path = ensure_tiny_llava(steps=steps)
        model, processor = load_llava_checkpoint(path)
        return model, Codec(processor), str(path)
    model, processor = load_llava_checkpoint(backbone)
    return model, Codec(processor, system=VICUNA_SYSTEM), str(Path(backbone).expanduser().absolute())


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def run_mcit(benchmark: str, methods: list[str], out: Path, seed: int = 0, preset: str = "default",
             backbone: str = "tiny", data_root: str = "", device: str = "cpu", sets: list[str] | None = None,
             notify: Callable[[str], None] = print,
             on_task: Callable[[str, int, str, list[float]], None] | None = None) -> list[McitOutcome]:
    """Run every method over the benchmark's sequence from the same base model; one results folder each."""
    if benchmark not in MCIT_BENCHMARKS:
        raise UserError(f"--benchmark {benchmark!r} is not an MCIT benchmark ({', '.join(MCIT_BENCHMARKS)})")
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is unknown for the MCIT setting; use {' or '.join(PRESETS)}")
    classes = {m: get_mcit_method(m) for m in methods}  # refuses CLIP-only methods before any work
    p = PRESETS[preset]
    loop = LoopConfig(**p["loop"])
    hparams = {m: cls.Hparams() for m, cls in classes.items()}
    sizes = {"n_train": p["n_train"], "n_test": p["n_test"]}
    apply_sets(sets or [], loop, hparams, sizes)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if benchmark == "synthetic-mcit":
        tasks, data_info = synthetic_tasks(**sizes), {"synthetic": sizes}
    else:
        from clbench.datasets.mtil import resolve_data_root
        from clbench.mcit.data import file_hashes

        root = resolve_data_root(data_root, benchmark)
        tasks, data_info = real_tasks(root, benchmark), {"root": str(root), "sha256": file_hashes(root, benchmark)}
    outcomes = []
    for name, cls in classes.items():
        start = time.perf_counter()
        model, codec, backbone_id = _backbone(backbone, p["pretrain_steps"], notify)
        model.to(dev)
        profiler = Profiler(device=dev)
        method = cls(model, hparams[name], profiler, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        result = run_sequence(model, codec, tasks, method, loop, profiler, dev, seed,
                              on_task=(lambda t, n, row, m=name: on_task(m, t, n, row)) if on_task else None)
        names = [t.name for t in tasks]
        metrics = mcit_metrics(result["matrix"], names)
        metrics.update(details=result["details"], losses=result["losses"], setting="mcit")
        path = run_dir(out, benchmark, 1, name, seed)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(path / "accuracy.csv", accuracy_frame(result["matrix"], names, names))
        atomic_write_csv(path / "base.csv", pd.DataFrame([result["base"]], columns=names))
        atomic_write_csv(path / "profile.csv", profiler.frame())
        atomic_write_json(path / "metrics.json", metrics)
        seconds = time.perf_counter() - start
        atomic_write_json(path / "manifest.json", {
            "setting": "mcit", "benchmark": benchmark, "method": name, "seed": seed, "preset": preset,
            "hparams": dataclasses.asdict(hparams[name]), "loop": dataclasses.asdict(loop), "backbone": backbone_id,
            "data": data_info, "tasks": names, "seconds": seconds, "status": "complete",
            "environment": {**environment_info(dev), "transformers": _transformers_version()}, "git": git_revision()})
        outcomes.append(McitOutcome(name, path, metrics, seconds))
    return outcomes
