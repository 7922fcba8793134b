"""Write the results folder of a release, with that release's code, for tests/storage/test_release_results.py.

    python tests/data/make_release_results.py --code /path/to/release/checkout [--out FOLDER]

Every command runs in a fresh interpreter with ``PYTHONPATH`` set to ``--code`` (so the results are written by
that checkout, not by the one holding this script), one thread, offline, and with its caches and user
configuration in a temporary folder. The folder (default ``tests/data/release-<version>``) holds:

- ``clip/``: a finished CLIP run of two methods on the embedded default (smoke preset);
- ``interrupted/``: a CLIP run stopped by SIGINT right after the checkpoint of its first task (the way a user's
  Ctrl-C or SLURM's SIGTERM stops one), with its resume checkpoint;
- ``mcit/``: a finished run of the LLaVA setting on its embedded benchmark;
- ``sweep/``: a finished ``clbench sweep`` of a two-point grid (its run folders carry ``sweep.json``);
- ``commands.json``: the exact command of each part (the test re-runs them), ``README.md``: where it came from.

The resume checkpoint holds the model's whole ``state_dict`` in float32 (30 MB for the tiny CLIP), most of it the
shipped pretrained weights unchanged. To keep the folder small, the byte ranges of the tensors that equal the
shipped float16 weights cast to float32 are cut out (``resume.stripped``) and listed with their source tensor
(``resume.holes.json``, with the SHA-256 of the whole file); :func:`rebuild_checkpoint` puts them back and checks
that the result is the file the release wrote, byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# The commands, run with the fixture folder as working directory (every --out is relative to it).
COMMANDS = {
    "clip": ["run", "--methods", "zeroshot,lora", "--preset", "smoke", "--threads", "1", "--quiet", "--out", "clip"],
    # 3 tasks and LoRA on the image tower only: the merged attention weights (the part of the checkpoint that is
    # not the shipped weights) are 1 MB instead of 2 MB; SIGINT comes after the checkpoint of task 1
    "interrupted": ["run", "--methods", "lora", "--preset", "smoke", "--set", "data.num_tasks=3",
                    "--set", "lora.encoders=vision", "--threads", "1", "--quiet", "--out", "interrupted"],
    # the default preset on a quarter of its data and epochs: the smoke preset's 20-step base model scores 0
    # everywhere, and an all-zero matrix cannot tell a right metric formula from a wrong one
    "mcit": ["run", "--methods", "lora", "--benchmark", "synthetic-mcit", "--set", "loop.epochs=3",
             "--set", "data.n_train=48", "--set", "data.n_test=16", "--threads", "1", "--quiet", "--out", "mcit"],
    "sweep": ["sweep", "--methods", "lora", "--preset", "smoke", "--grid", "lora.rank=2,4", "--set",
              "data.num_tasks=2", "--launcher", "inline", "--quiet", "--out", "sweep"],
}
STOP_AFTER = 1  # tasks done when the interrupted run gets its SIGINT

# `clbench` through its entry function; INTERRUPT first makes the runner send itself SIGINT once the checkpoint of
# STOP_AFTER tasks is on disk (inside the section that writes a task's files, so the signal waits for its end).
# The command line's package (home of the console entry point's main, before and after the split into subpackages)
# and the runner are named in pieces, so that the import rewrites of that split leave this script able to run the
# code of either side.
CLBENCH = "import importlib, sys; sys.exit(importlib.import_module('clbench.' + 'cli').main(sys.argv[1:]))"
INTERRUPT = """
import importlib, os, signal, sys
try:
    import clbench.engine.session as runner  # where the run's checkpoint is saved since the one run engine
except ModuleNotFoundError:
    runner = importlib.import_module("clbench." + "runner")  # at the package root up to 0.1.0
save, stop_after = runner.save_checkpoint, int(sys.argv.pop(1))
def save_then_interrupt(path, ckpt):
    save(path, ckpt)
    if ckpt.completed == stop_after:
        os.kill(os.getpid(), signal.SIGINT)
runner.save_checkpoint = save_then_interrupt
sys.exit(importlib.import_module("clbench." + "cli").main(sys.argv[1:]))
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_layout(data: bytes) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file's bytes."""
    (size,) = struct.unpack("<Q", data[:8])
    return 8 + size, json.loads(data[8:8 + size])


def float32_bytes(array: np.ndarray) -> bytes:
    """Little-endian float32 bytes of ``array`` (float16 -> float32 is exact)."""
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def strip_checkpoint(path: Path, weights_file: Path) -> dict:
    """Replace ``path`` by ``resume.stripped`` + ``resume.holes.json`` (see the module docstring)."""
    from safetensors.numpy import load_file

    data = path.read_bytes()
    weights = load_file(str(weights_file))
    base, header = safetensors_layout(data)
    holes = []
    for key, info in header.items():
        if key == "__metadata__" or info["dtype"] != "F32":
            continue
        start, end = (base + o for o in info["data_offsets"])
        # the longest weights name the key ends with: visual.transformer.* before transformer.*
        source = max((name for name in weights if key.endswith(("/" + name, "." + name))), key=len, default=None)
        if source is not None and weights[source].shape == tuple(info["shape"]) \
                and data[start:end] == float32_bytes(weights[source]):
            holes.append({"offset": start, "nbytes": end - start, "tensor": source})
    holes.sort(key=lambda h: h["offset"])
    kept, cursor = bytearray(), 0
    for hole in holes:
        kept += data[cursor:hole["offset"]]
        cursor = hole["offset"] + hole["nbytes"]
    kept += data[cursor:]
    record = {"file": path.name, "sha256": sha256(data), "bytes": len(data), "weights": weights_file.name,
              "weights_sha256": sha256(weights_file.read_bytes()), "holes": holes}
    (path.parent / "resume.stripped").write_bytes(bytes(kept))
    (path.parent / "resume.holes.json").write_text(json.dumps(record, indent=1) + "\n")
    path.unlink()
    assert rebuild_checkpoint(path.parent, weights_file) == data
    return record


def rebuild_checkpoint(folder: Path, weights_file: Path) -> bytes:
    """The checkpoint's original bytes from ``resume.stripped``, ``resume.holes.json`` and the shipped weights;
    raises AssertionError when they do not give the file the release wrote (its SHA-256)."""
    from safetensors.numpy import load_file

    record = json.loads((folder / "resume.holes.json").read_text())
    assert sha256(weights_file.read_bytes()) == record["weights_sha256"], \
        f"{weights_file} is not the weights file the release shipped"
    weights, kept = load_file(str(weights_file)), (folder / "resume.stripped").read_bytes()
    out, read, cursor = bytearray(), 0, 0
    for hole in record["holes"]:
        take = hole["offset"] - cursor
        out += kept[read:read + take] + float32_bytes(weights[hole["tensor"]])
        read, cursor = read + take, hole["offset"] + hole["nbytes"]
    out += kept[read:]
    assert len(out) == record["bytes"] and sha256(bytes(out)) == record["sha256"], "rebuilt checkpoint differs"
    return bytes(out)


def isolated_env(code: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLBENCH_CONFIG", "CLBENCH_DATA_ROOT")}
    env.update(PYTHONPATH=str(code), OMP_NUM_THREADS="1", CLBENCH_CACHE=str(cache / "clbench"),
               HF_HOME=str(cache / "hf"), XDG_CACHE_HOME=str(cache / "xdg"), XDG_CONFIG_HOME=str(cache / "config"),
               HF_HUB_OFFLINE="1")
    return env


def run(args: list[str], cwd: Path, env: dict[str, str], interrupt: bool = False) -> None:
    prefix = [sys.executable, "-c", INTERRUPT, str(STOP_AFTER)] if interrupt else [sys.executable, "-c", CLBENCH]
    print("$ clbench " + " ".join(args), flush=True)
    proc = subprocess.run([*prefix, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    expected = 128 + 2 if interrupt else 0  # SIGINT: the command line exits 130
    if proc.returncode != expected:
        raise SystemExit(f"exit status {proc.returncode}, expected {expected}:\n{proc.stderr[-3000:]}")


def git(code: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(code), *args], capture_output=True, text=True, check=True).stdout.strip()


def readme(version: str, commit: str, record: dict, sizes: str) -> str:
    lines = [f"# Results written by clbench {version} (commit {commit[:7]})", "",
             "Made by `tests/data/make_release_results.py` with the release's own code, for "
             "`tests/storage/test_release_results.py` (results written before a change must still load, resume and "
             "report).",
             f"Commit: `{commit}` (clean checkout). Each command ran as `PYTHONPATH=<that checkout> clbench ...` in "
             "this folder, one thread, offline, caches and user configuration in a temporary folder:", ""]
    for name, args in COMMANDS.items():
        note = f"   # SIGINT after the checkpoint of task {STOP_AFTER}" if name == "interrupted" else ""
        lines.append(f"    clbench {' '.join(args)}{note}")
    lines += ["", "To make it again: `python tests/data/make_release_results.py --code <checkout of that commit>`.",
              "", f"`interrupted/.../resume.safetensors` ({record['bytes']} bytes, SHA-256 `{record['sha256']}`) "
              f"is stored as `resume.stripped` without the {len(record['holes'])} tensors that equal the shipped "
              f"weights `{record['weights']}` cast to float32; `resume.holes.json` says where they go and the test "
              "rebuilds the file and checks its SHA-256 before resuming.", "", f"Size: {sizes}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=REPO, help="the release checkout whose code writes the results")
    parser.add_argument("--out", type=Path, help="default: tests/data/release-<version>")
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    opts = parser.parse_args()
    code = opts.code.resolve()
    if git(code, "status", "--porcelain", "--untracked-files=no"):
        raise SystemExit(f"{code} has uncommitted changes; use a clean checkout of the release")
    commit = git(code, "rev-parse", "HEAD")
    version = subprocess.run([sys.executable, "-c", "import clbench; print(clbench.__version__)"], check=True,
                             env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True).stdout.strip()
    out = (opts.out or HERE / f"release-{version}").resolve()
    if out.exists():
        if not opts.force:
            raise SystemExit(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        work, env = Path(tmp) / "results", isolated_env(code, Path(tmp) / "cache")
        work.mkdir()
        for name, args in COMMANDS.items():
            run(args, work, env, interrupt=name == "interrupted")
        (ckpt,) = (work / "interrupted").rglob("resume.safetensors")
        manifest = json.loads((ckpt.parent / "manifest.json").read_text())
        assert manifest["status"] == "interrupted" and manifest["completed_tasks"] == STOP_AFTER, manifest
        record = strip_checkpoint(ckpt, Path(manifest["weights"]))
        (work / "commands.json").write_text(json.dumps({"version": version, "commit": commit,
                                                        "stop_after": STOP_AFTER, "commands": COMMANDS},
                                                       indent=1) + "\n")
        files = [p for p in work.rglob("*") if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        size = f"{total / 1e6:.2f} MB in {len(files) + 1} files (this README included)"
        (work / "README.md").write_text(readme(version, commit, record, size))
        shutil.copytree(work, out)
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
