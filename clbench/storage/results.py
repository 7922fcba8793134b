"""Run directories and atomic writes: the results contract other tools rely on.

A (benchmark, order, method, seed) run lives in ``<out>/<benchmark>-order<k>/<method>/seed<s>/`` and holds
``accuracy.csv``, ``zeroshot.csv``, ``metrics.json``, ``profile.csv``, ``config.json`` and ``manifest.json``.
Every file is written to a temporary name in the same folder and renamed, so a reader never sees half a
file; ``manifest.json``'s ``status`` says whether the run is ``running``, ``complete``, ``failed`` or ``interrupted``
(SIGTERM/SIGINT), and ``complete`` is trusted only with its files (:func:`missing_results`). While a
run is in progress its folder also holds ``run.lock`` (:mod:`clbench.storage.lock`) and, after each completed task,
``resume.safetensors`` (:mod:`clbench.storage.checkpoint`, deleted once the run is complete). Everything here is
JSON, CSV or safetensors: nothing clbench writes is a pickle.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from clbench.errors import UserError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$")


def safe_component(value: str, what: str) -> str:
    """A path component built from configuration: no separators, no ``..``, nothing absolute."""
    if not SAFE_NAME.match(value) or ".." in value:
        raise UserError(f"{what} {value!r} cannot be used in a path; use letters, digits and _.+=,- only")
    return value


def group_label(benchmark: str, eval_rule: str | None) -> str:
    """``benchmark``, or ``benchmark-<rule>`` when ``eval_rule`` is not the benchmark's own (``mtil-union``): the
    name that keeps runs, and reports, under the two evaluation rules apart."""
    from clbench.config import DEFAULT_EVAL

    own = not eval_rule or eval_rule == DEFAULT_EVAL.get(benchmark, eval_rule)
    return benchmark if own else f"{benchmark}-{eval_rule}"


def run_dir(out: Path, benchmark: str, order: int, method: str, seed: int, eval_rule: str = "",
            datasets: str = "") -> Path:
    """``out/<benchmark>-order<k>/<method>/seed<s>``; an evaluation rule other than the benchmark's own
    (``--eval union`` on mtil, ``--eval task`` on xtail) is part of the first folder
    (``mtil-union-order1``), so runs under both rules never share a folder. A dataset selection (``datasets``,
    comma-separated) replaces the order: ``mtil-mnist+eurosat``."""
    sequence = "+".join(d.strip().lower() for d in datasets.split(",")) if datasets.strip() else f"order{order}"
    parts = [safe_component(f"{group_label(benchmark, eval_rule)}-{sequence}", "benchmark"),
             safe_component(method, "method name"),
             f"seed{int(seed)}"]
    path = Path(out).joinpath(*parts)
    if Path(out).resolve() not in path.resolve().parents:
        raise UserError(f"run folder {path} would fall outside {out}")
    return path


def _atomic(path: Path, write) -> None:
    _atomic_via_file(path, lambda tmp: _write_with(tmp, write))


def _write_with(tmp: str, write) -> None:
    with open(tmp, "wb") as fh:
        write(fh)


def _atomic_via_file(path: Path, write_file: Callable[[str], None]) -> None:
    """Let ``write_file`` fill a temporary file in ``path``'s folder, flush it to disk, rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_file(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(Path(path), lambda fh: fh.write(text.encode()))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(Path(path), lambda fh: fh.write(data))


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(path: Path, frame: pd.DataFrame, index: bool = False) -> None:
    atomic_write_text(path, frame.to_csv(index=index, float_format="%.4f", lineterminator="\n"))


def atomic_write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Tensors (copied to the CPU) and string metadata as one safetensors file, written atomically.

    Streamed to the temporary file, not built in memory first, so a large model costs one CPU copy.
    """
    from safetensors.torch import save_file

    cpu = {k: _cpu_copy(v) for k, v in tensors.items()}
    _atomic_via_file(Path(path), lambda tmp: save_file(cpu, tmp, metadata=metadata))


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its memory (safetensors refuses tensors that share storage)."""
    tensor = tensor.detach()
    return tensor.contiguous().clone() if tensor.device.type == "cpu" else tensor.cpu().contiguous()


def accuracy_frame(rows: list[list[float]], trained_on: list[str], datasets: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=datasets)
    frame.insert(0, "trained_on", trained_on)
    return frame


def read_accuracy_csv(path: Path) -> pd.DataFrame:
    """Read a matrix in the ``accuracy.csv`` format: ``trained_on`` then one column per dataset.

    Only a regular file of bounded size is read (:mod:`clbench.storage.safeio`); duplicate column names are refused
    (pandas would silently rename the second one)."""
    import csv
    import io

    from clbench.storage.safeio import read_text

    fix = "give a CSV with a trained_on column"
    text = read_text(path, "accuracy matrix", fix)
    header = next(csv.reader(io.StringIO(text)), [])
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise UserError(f"{path} names column(s) {', '.join(map(repr, twice))} more than once; give each dataset "
                        "one column")
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"cannot read accuracy matrix {path}: {detail}; {fix}") from None
    if "trained_on" not in frame.columns or len(frame) == 0:
        raise UserError(f"{path} is not an accuracy matrix: it needs a 'trained_on' column and one row per task")
    values = frame.drop(columns="trained_on")
    if not all(pd.api.types.is_numeric_dtype(values[c]) for c in values.columns):
        raise UserError(f"{path} has non-numeric accuracies; every cell after trained_on must be a number")
    return frame


COMPLETE_FILES = ("config.json", "accuracy.csv", "zeroshot.csv", "metrics.json", "profile.csv")
# The MCIT (LLaVA) layout: the base model's row in base.csv, the task list under "tasks", MCITlib's metrics (MAA).
MCIT_COMPLETE_FILES = ("config.json", "accuracy.csv", "base.csv", "metrics.json", "profile.csv")


def missing_results(folder: Path, datasets: list[str] | None = None, setting: str = "clip") -> str | None:
    """Why ``folder``'s files do not back a ``complete`` status (a file missing or unreadable, fewer accuracy rows
    than tasks), or None when they do. ``datasets`` defaults to the task list in its ``config.json``; ``setting``
    ``"mcit"`` checks an MCIT run folder's files (:mod:`clbench.mcit.runner`)."""
    from clbench.storage.safeio import is_regular, read_json

    folder = Path(folder)
    mcit = setting == "mcit"
    for name in MCIT_COMPLETE_FILES if mcit else COMPLETE_FILES:
        if not is_regular(folder / name):
            return f"{name} is missing"
    try:
        if datasets is None:
            config = read_json(folder / "config.json", "run file", "")
            datasets = config.get("tasks" if mcit else "datasets") if isinstance(config, dict) else None
            if not isinstance(datasets, list):
                return "config.json names no task list"
        metrics = read_json(folder / "metrics.json", "run file", "")
        if not isinstance(metrics, dict) or ("maa" if mcit else "last") not in metrics:
            return "metrics.json holds no metrics"
        frame = read_accuracy_csv(folder / "accuracy.csv")
    except UserError as exc:
        return str(exc).split(";")[0]
    if [str(x) for x in frame["trained_on"]] != [str(d) for d in datasets]:
        return f"accuracy.csv has {len(frame)} of {len(datasets)} task rows"
    return None


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files (``.<name>.*.tmp``) of atomic writes that a kill interrupted. Only for a folder
    whose lock this process holds: then no other writer can own them."""
    import time

    for tmp in Path(folder).glob(".*.tmp"):
        if not tmp.is_file() or tmp.is_symlink():
            continue
        # another process may be taking the lock this instant (its temporary lives for microseconds)
        if tmp.name.startswith(".run.lock.") and time.time() - tmp.stat().st_mtime < 60:
            continue
        tmp.unlink(missing_ok=True)


def environment_info(device: torch.device | str) -> dict:
    import open_clip

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_revision": git_revision(),
        **thread_info(),
    }


def thread_info() -> dict:
    """The CPU thread counts and the BLAS/LAPACK torch was built with: results are bit-identical across runs only
    for the same thread count (reductions split differently)."""
    import re

    build = torch.__config__.show()

    def setting(key: str) -> str | None:
        found = re.search(rf"{key}=([^,\s]+)", build)
        return found.group(1) if found else None

    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "blas": setting("BLAS_INFO"), "lapack": setting("LAPACK_INFO")}


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
