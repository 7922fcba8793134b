"""Resume checkpoints: everything a run needs to continue after its last completed task, in one file.

``<run folder>/resume.safetensors`` is rewritten atomically after every task. Its tensors are the model's
full ``state_dict()`` (``model/<key>``; the official KeepLoRA/InfLoRA code also saves whole models), the
method's ``state_dict()`` (``method/<key>``: stored bases, memories, heads, histories) and torch's generator
states (``rng/torch``, ``rng/cuda/<i>``). Its JSON (the safetensors header's ``clbench`` metadata entry)
holds the run id, the tasks done, the zero-shot row and accuracy rows so far (and under ``--eval union`` the
task-selection recall rows), the profiler's records, the
method's ``extra_state()`` and Python's and NumPy's global generator states. Nothing in it is a pickle:
reading it cannot run code, and a file that is not a clbench checkpoint is refused with one line.

The harness reseeds every task from the seed and the task index (:func:`clbench.engine.harness.run_sequence`), so
the stored generator states are restored for completeness, not because the next task depends on them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clbench.errors import UserError
from clbench.storage.results import atomic_write_safetensors

CHECKPOINT_NAME = "resume.safetensors"
FORMAT = "clbench-resume/1"
META_KEY = "clbench"
DIGEST_KEY = "clbench_sha256"


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
    """Write ``ckpt`` to ``path`` atomically (a reader sees the previous checkpoint or this one, whole), with a
    SHA-256 digest of its JSON and tensors, so a file edited or damaged afterwards is refused on resume."""
    tensors = _flat_tensors(ckpt)
    info = ckpt.info()
    atomic_write_safetensors(path, tensors, metadata={META_KEY: json.dumps(info, allow_nan=True),
                                                      DIGEST_KEY: digest(info, tensors)})


def _flat_tensors(ckpt: Checkpoint) -> dict[str, Tensor]:
    tensors = {f"model/{k}": v for k, v in ckpt.model.items()}
    tensors.update({f"method/{k}": v for k, v in ckpt.method.items()})
    tensors.update({f"rng/{k}": v for k, v in ckpt.rng.items()})
    return tensors


def digest(info: dict, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the JSON part and every tensor (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256(json.dumps(info, sort_keys=True, allow_nan=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach()
        t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"cannot resume from {path}: {why}; delete it and rerun without --resume to start over")


def read_info(path: Path) -> dict:
    """The JSON part of the checkpoint at ``path``, read from the header only (no tensor data)."""
    from safetensors import safe_open

    from clbench.storage.safeio import check_regular

    check_regular(path, "resume checkpoint", "delete it and rerun without --resume to start over")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a non-safetensors file
        raise _refuse(path, f"it is not a safetensors file ({type(exc).__name__})") from None
    try:
        info = json.loads(meta[META_KEY])
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError):
        raise _refuse(path, "it is not a clbench resume checkpoint") from None
    if isinstance(info, dict):
        info[DIGEST_KEY] = meta.get(DIGEST_KEY)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _refuse(path, f"its format is {info.get('format') if isinstance(info, dict) else None!r}, "
                            f"this clbench writes {FORMAT!r}")
    return info


def check_info(path: Path, info: dict, run_id: str, datasets: list[str], union: bool, upper: float = 100.0) -> int:
    """Check the JSON part of a checkpoint against the run it is to continue; returns the tasks completed.

    Every field is checked for type and size before use: an edited ``completed`` count, accuracy rows of the
    wrong number or length or outside 0-100, a task list of another run, bad generator states or profile records
    are a one-line UserError (never a partial matrix marked complete, nor a traceback). ``upper`` bounds the
    scores (MCIT caption averages include CIDEr x 100, which can pass 100)."""
    n = len(datasets)

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _refuse(path, what)

    need(info.get("run_id") == run_id, "it belongs to another run configuration")
    need(info.get("datasets") == list(datasets), "its task list is not this run's")
    completed = info.get("completed")
    need(isinstance(completed, int) and not isinstance(completed, bool) and 1 <= completed <= n,
         f"its completed-task count {completed!r} is not between 1 and {n}")
    span = f"0-{upper:g}"
    need(_row(info.get("zeroshot"), n, upper), f"its zero-shot row is not {n} accuracies in {span}")
    rows = info.get("rows")
    need(isinstance(rows, list) and len(rows) == completed and all(_row(r, n, upper) for r in rows),
         f"its accuracy rows are not {completed} rows of {n} accuracies in {span}")
    recall = info.get("recall", {})
    if union:
        need(isinstance(recall, dict) and _row(recall.get("zeroshot"), n) and isinstance(recall.get("rows"), list)
             and len(recall["rows"]) == completed and all(_row(r, n) for r in recall["rows"]),
             f"its task-selection recall is not {completed + 1} rows of {n} values in 0-100")
    else:
        need(recall in ({}, None), "it holds task-selection recall, which only a union-evaluation run has")
    need(isinstance(info.get("method_extra"), dict), "its method state is not a JSON object")
    for key in ("profile", "state_bytes"):
        value = info.get(key)
        need(isinstance(value, list) and all(isinstance(r, dict) for r in value), f"its {key} is not a list of records")
    _check_rng_extra(path, info.get("rng_extra"))
    return completed


def _row(values, n: int, upper: float = 100.0) -> bool:
    """Whether ``values`` is a list of ``n`` numbers in 0-``upper`` (percent; NaN never passes)."""
    return (isinstance(values, list) and len(values) == n
            and all(isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= upper for v in values))


def _check_rng_extra(path: Path, extra) -> None:
    """Python's and NumPy's generator states must be ones their own ``setstate`` accepts (tried on scratch
    generators, so the global ones are untouched)."""
    if not isinstance(extra, dict):
        raise _refuse(path, "its generator states are not a JSON object")
    try:
        if "python" in extra:
            version, values, gauss = extra["python"]
            random.Random().setstate((version, tuple(values), gauss))
        if "numpy" in extra:
            kind, keys, pos, has_gauss, cached = extra["numpy"]
            np.random.RandomState().set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, OverflowError, IndexError) as exc:
        raise _refuse(path, f"its generator states are garbled ({type(exc).__name__})") from None


def check_rng_tensors(path: Path, rng: dict[str, Tensor]) -> None:
    """torch's generator states must be byte vectors of the length this torch uses."""
    size = torch.get_rng_state().shape
    for key, value in rng.items():
        ok = value.dtype == torch.uint8 and value.dim() == 1
        if key == "torch":
            ok = ok and value.shape == size
        elif not key.startswith("cuda/") or not key[5:].isdigit():
            ok = False
        if not ok:
            raise _refuse(path, f"its generator state rng/{key} is not a torch generator state")


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
    stored = info.pop(DIGEST_KEY, None)
    if not stored or stored != digest(info, tensors):
        raise _refuse(path, "its content does not match the digest written with it (edited or damaged)")
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
