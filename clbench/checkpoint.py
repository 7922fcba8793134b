"""Resume checkpoints: everything a run needs to continue after its last completed task, in one file.

``<run folder>/resume.safetensors`` is rewritten atomically after every task. Its tensors are the model's
full ``state_dict()`` (``model/<key>``; the official KeepLoRA/InfLoRA code also saves whole models), the
method's ``state_dict()`` (``method/<key>``: stored bases, memories, heads, histories) and torch's generator
states (``rng/torch``, ``rng/cuda/<i>``). Its JSON (the safetensors header's ``clbench`` metadata entry)
holds the run id, the tasks done, the zero-shot row and accuracy rows so far (and under ``--eval union`` the
task-selection recall rows), the profiler's records, the
method's ``extra_state()`` and Python's and NumPy's global generator states. Nothing in it is a pickle:
reading it cannot run code, and a file that is not a clbench checkpoint is refused with one line.

The harness reseeds every task from the seed and the task index (:func:`clbench.harness.run_sequence`), so
the stored generator states are restored for completeness, not because the next task depends on them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clbench.errors import UserError
from clbench.results import atomic_write_safetensors

CHECKPOINT_NAME = "resume.safetensors"
FORMAT = "clbench-resume/1"
META_KEY = "clbench"


@dataclass
class Checkpoint:
    """A run's state after ``completed`` tasks."""

    run_id: str
    completed: int
    datasets: list[str]
    zeroshot: list[float]
    rows: list[list[float]]
    recall: dict = field(default_factory=dict)  # union evaluation: {"zeroshot": row, "rows": rows}
    model: dict[str, Tensor] = field(default_factory=dict)
    method: dict[str, Tensor] = field(default_factory=dict)
    method_extra: dict = field(default_factory=dict)
    profile: list[dict] = field(default_factory=list)
    state_bytes: list[dict] = field(default_factory=list)
    rng: dict[str, Tensor] = field(default_factory=dict)
    rng_extra: dict = field(default_factory=dict)

    def info(self) -> dict:
        """The JSON part (everything but the tensors)."""
        return {"format": FORMAT, "run_id": self.run_id, "completed": self.completed, "datasets": self.datasets,
                "zeroshot": self.zeroshot, "rows": self.rows, "recall": self.recall, "method_extra": self.method_extra,
                "profile": self.profile, "state_bytes": self.state_bytes, "rng_extra": self.rng_extra}


# ---- generator states ---------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, Tensor], dict]:
    """torch (CPU and every CUDA device) generator states as tensors; Python's and NumPy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    version, values, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    extra = {"python": [version, list(values), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, extra


def restore_rng(tensors: dict[str, Tensor], extra: dict) -> None:
    """Inverse of :func:`capture_rng`; CUDA states are restored when the same devices are there."""
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])
    if "python" in extra:
        version, values, gauss = extra["python"]
        random.setstate((version, tuple(values), gauss))
    if "numpy" in extra:
        kind, keys, pos, has_gauss, cached = extra["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- reading and writing ------------------------------------------------------------------------------
def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (a reader sees the previous checkpoint or this one, whole)."""
    tensors = {f"model/{k}": v for k, v in ckpt.model.items()}
    tensors.update({f"method/{k}": v for k, v in ckpt.method.items()})
    tensors.update({f"rng/{k}": v for k, v in ckpt.rng.items()})
    atomic_write_safetensors(path, tensors, metadata={META_KEY: json.dumps(ckpt.info(), allow_nan=True)})


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"cannot resume from {path}: {why}; delete it and rerun without --resume to start over")


def read_info(path: Path) -> dict:
    """The JSON part of the checkpoint at ``path``, read from the header only (no tensor data)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a non-safetensors file
        raise _refuse(path, f"it is not a safetensors file ({type(exc).__name__})") from None
    try:
        info = json.loads(meta[META_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise _refuse(path, "it is not a clbench resume checkpoint") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _refuse(path, f"its format is {info.get('format') if isinstance(info, dict) else None!r}, "
                            f"this clbench writes {FORMAT!r}")
    return info


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is a one-line UserError."""
    from safetensors.torch import load_file

    info = read_info(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise _refuse(path, f"its tensors cannot be read ({type(exc).__name__}: {exc})") from None
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "method": {}, "rng": {}}
    for key, value in tensors.items():
        head, sep, rest = key.partition("/")
        if not sep or head not in groups:
            raise _refuse(path, f"it holds an unexpected entry {key!r}")
        groups[head][rest] = value
    try:
        return Checkpoint(run_id=str(info["run_id"]), completed=int(info["completed"]),
                          datasets=list(info["datasets"]), zeroshot=list(info["zeroshot"]),
                          rows=[list(r) for r in info["rows"]], recall=dict(info.get("recall", {})),
                          model=groups["model"], method=groups["method"],
                          method_extra=dict(info["method_extra"]), profile=list(info["profile"]),
                          state_bytes=list(info["state_bytes"]), rng=groups["rng"],
                          rng_extra=dict(info["rng_extra"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise _refuse(path, f"its JSON lacks or garbles {exc}") from None
