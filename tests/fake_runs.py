"""Synthetic run folders for report tests, written by the real writer (:func:`clbench.engine.runner.write_results`)
with the same config.json / manifest.json layout as :func:`clbench.engine.session.execute` (with
:class:`clbench.engine.runner.ClipRunJob`)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from clbench.config import RunConfig, method_run_config, run_id
from clbench.costs.profiler import Profiler, SectionRecord
from clbench.engine.harness import SequenceResult
from clbench.engine.runner import write_results
from clbench.storage.results import accuracy_frame, atomic_write_csv, atomic_write_json, run_dir

DATASETS = ["Aircraft", "Caltech101", "CIFAR100", "OxfordPet"]


def random_matrix(rng: np.random.Generator, num: int) -> tuple[np.ndarray, np.ndarray]:
    """(zero-shot row, T x T matrix) of plausible accuracies in percent."""
    zeroshot = rng.uniform(20, 80, num)
    rows = np.clip(zeroshot + rng.uniform(-15, 25, (num, num)), 0, 100)
    return zeroshot, rows


def fake_profiler(rng: np.random.Generator, num: int, sections: tuple[str, ...], with_state: bool,
                  nested: dict[str, str] | None = None) -> Profiler:
    """A profiler holding setup/eval before the first task and ``sections`` + eval for every task; a section named
    in ``nested`` (child -> parent) runs inside its parent and takes a part of the parent's time."""
    nested = nested or {}
    prof = Profiler()
    prof.records.append(SectionRecord(-1, "setup", float(rng.uniform(0.1, 1)), int(rng.integers(1, 9) * 2**20),
                                      "cpu_process_peak_rss"))
    prof.records.append(SectionRecord(-1, "eval", float(rng.uniform(0.5, 2)), int(rng.integers(1, 9) * 2**20),
                                      "cpu_process_peak_rss"))
    for task in range(num):
        for name in (*sections, "eval"):
            prof.records.append(SectionRecord(task, name, float(rng.uniform(0.5, 5)),
                                              int(rng.integers(10, 90) * 2**20), "cpu_process_peak_rss",
                                              calls=int(rng.integers(1, 4))))
        if with_state:
            prof.record_state(task, "basis", int((task + 1) * rng.integers(1000, 5000)))
            prof.record_state(task, "head", 4096)
    for rec in prof.records:
        parent = nested.get(rec.section)
        if parent:
            outer = next(r for r in prof.records if r.task == rec.task and r.section == parent)
            rec.parent = parent
            rec.seconds = outer.seconds * 0.4
    return prof


def write_fake_run(out: Path, method: str, seed: int, *, datasets: list[str] | None = None,
                   benchmark: str = "synthetic", order: int = 1, status: str = "complete",
                   hparams: dict | None = None, rng_seed: int | None = None,
                   sections: tuple[str, ...] = ("train", "merge"), with_state: bool = False,
                   nested: dict[str, str] | None = None, setup_sections: tuple[str, ...] = ()) -> Path:
    """One run folder in the results contract; ``status != 'complete'`` leaves the rows half done."""
    datasets = list(datasets or DATASETS)
    rng = np.random.default_rng(zlib.crc32(f"{method}/{seed}".encode()) if rng_seed is None else rng_seed)
    zeroshot, rows = random_matrix(rng, len(datasets))
    cfg = RunConfig(benchmark=benchmark, order=order, seed=seed, methods={method: dict(hparams or {})})
    resolved = method_run_config(cfg, method)
    resolved["datasets"] = datasets
    path = run_dir(out, benchmark, order, method, seed)
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"status": "running", "run_id": run_id(resolved), "method": method, "seed": seed,
                "benchmark": benchmark, "order": order, "started": 0.0, "environment": {}, "benchmark_info": {}}
    atomic_write_json(path / "config.json", resolved)
    profiler = fake_profiler(rng, len(datasets), sections, with_state, nested)
    for name in setup_sections:  # sections of the setup before the first task (e.g. pretrained_svd)
        setup = next(r for r in profiler.records if r.task == -1 and r.section == "setup")
        profiler.records.append(SectionRecord(-1, name, setup.seconds * 0.5, setup.peak_bytes, setup.memory_kind,
                                              parent="setup"))
    done = len(datasets) if status == "complete" else len(datasets) // 2
    write_results(path, SequenceResult(datasets, zeroshot.tolist(), rows[:done].tolist()), profiler)
    manifest.update(status=status, finished=1.0, seconds=1.0)
    atomic_write_json(path / "manifest.json", manifest)
    return path


def write_external_csv(path: Path, datasets: list[str] | None = None, rng_seed: int = 0,
                       shuffle_columns: bool = False) -> Path:
    """An accuracy matrix made 'elsewhere', in the accuracy.csv format (columns optionally shuffled)."""
    datasets = list(datasets or DATASETS)
    rng = np.random.default_rng(rng_seed)
    _, rows = random_matrix(rng, len(datasets))
    frame = accuracy_frame(rows.tolist(), datasets, datasets)
    if shuffle_columns:
        frame = frame[["trained_on", *reversed(datasets)]]
    atomic_write_csv(path, frame)
    return path
