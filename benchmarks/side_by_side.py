"""Time the same commands on two checkouts side by side: is the new code any slower than the old?

    python -m benchmarks.side_by_side --before /path/old --after /path/new            # full: the README's run
    python -m benchmarks.side_by_side --before /path/old --after /path/new --quick    # smoke preset, 2 repetitions

Each command runs in a fresh process with ``PYTHONPATH`` set to one checkout and this interpreter (so both sides
share one virtual environment and one ``clbench`` entry script), its working directory the checkout, a fresh
temporary results folder, cache and user configuration, offline. The two sides alternate (before, after, then
after, before, ...), so a machine whose load drifts during the measurement slows both alike. Printed per command:
the median wall time of each side, their ratio (after / before; above 1 = slower), the ratio of the fastest runs,
and the median CPU time the command's processes used with its ratio (less sensitive to other jobs on a shared
machine: on a loaded 2-core machine two checkouts of the same library code differed by 15 % in median wall time
and 2.5 % in CPU time). ``--json FILE`` keeps every measurement. For ``run`` commands it also says whether both
sides wrote the same accuracy matrices.

Commands (``--commands``): ``run`` (the README's main command, default preset), ``run-smoke`` (the same with
``--preset smoke``), ``help`` (``clbench --help``: start-up), ``import`` (importing the command line),
``tests`` (the README's test command: the whole suite; hours on 2 cores, and each side runs its own tests) and
``embedded-quick`` (``python -m benchmarks.embedded --seeds 0 --orders 1``). Default: run, help, import;
``--quick``: run-smoke, help, import, 2 repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = sys.executable
CLBENCH = str(Path(sys.executable).with_name("clbench"))
METHODS = "zeroshot,finetune,lora"
# the command line's package, named in two pieces so that import-path rewrites of a package split leave this string
# valid for both sides (the package keeps its name; its modules move)
CLI_PACKAGE = "clbench." + "cli"
COMMANDS: dict[str, list[str]] = {
    "run": [CLBENCH, "run", "--methods", METHODS, "--order", "1", "--out", "{out}"],
    "run-smoke": [CLBENCH, "run", "--methods", METHODS, "--order", "1", "--preset", "smoke", "--out", "{out}"],
    "help": [CLBENCH, "--help"],
    # `.app` loads the whole command line on both sides: the package's own import became lazy in the split
    "import": [PYTHON, "-c", f"import {CLI_PACKAGE} as cli; cli.app"],
    "tests": [PYTHON, "-m", "pytest", "-q", "--benchmark-disable", "-p", "no:cacheprovider"],
    "embedded-quick": [PYTHON, "-m", "benchmarks.embedded", "--seeds", "0", "--orders", "1", "--out", "{out}"],
}
FULL, QUICK = ("run", "help", "import"), ("run-smoke", "help", "import")
SIDES = ("before", "after")


@dataclass
class Times:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def side_env(checkout: Path, scratch: Path, threads: int | None) -> dict[str, str]:
    """The environment of one command: this checkout first on the path, fresh caches, no user data root."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLBENCH_CONFIG", "CLBENCH_DATA_ROOT", "PYTHONPATH")}
    env.update(PYTHONPATH=str(checkout), CLBENCH_CACHE=str(scratch / "cache"), HF_HOME=str(scratch / "hf"),
               XDG_CACHE_HOME=str(scratch / "xdg"), XDG_CONFIG_HOME=str(scratch / "config"), HF_HUB_OFFLINE="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def check_checkout(name: str, checkout: Path) -> str:
    """The commit of ``checkout``; exits when the interpreter would import clbench from somewhere else."""
    with tempfile.TemporaryDirectory() as tmp:
        found = subprocess.run([PYTHON, "-c", "import clbench; print(clbench.__file__)"], cwd=checkout,
                               env=side_env(checkout, Path(tmp), None), capture_output=True, text=True)
    if found.returncode != 0 or not Path(found.stdout.strip()).resolve().is_relative_to(checkout):
        raise SystemExit(f"--{name} {checkout}: clbench is imported from {found.stdout.strip() or found.stderr[-300:]}"
                         ", not from that checkout; give the root of a clbench checkout")
    rev = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (rev.stdout.strip() or "?") + (" (uncommitted changes)" if dirty else "")


def matrices(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("accuracy.csv"))}


def run_once(command: str, checkout: Path, threads: int | None) -> tuple[float, float, dict[str, bytes]]:
    """(wall seconds, CPU seconds of its processes, accuracy matrices written) of one run of ``command``."""
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        scratch = Path(tmp)
        out = scratch / "results"
        args = [a.replace("{out}", str(out)) for a in COMMANDS[command]]
        cpu, start = children_cpu(), time.perf_counter()
        proc = subprocess.run(args, cwd=checkout, env=side_env(checkout, scratch, threads), capture_output=True,
                              text=True)
        wall, cpu = time.perf_counter() - start, children_cpu() - cpu
        if proc.returncode != 0:
            raise SystemExit(f"{command} failed in {checkout} (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
        return wall, cpu, matrices(out) if out.exists() else {}


def ratio(after: list[float], before: list[float]) -> float:
    return statistics.median(after) / statistics.median(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the old code (its root)")
    parser.add_argument("--after", type=Path, required=True, help="checkout of the new code (its root)")
    parser.add_argument("--quick", action="store_true", help="run-smoke, help and import, 2 repetitions")
    parser.add_argument("--commands", help=f"comma-separated, from {', '.join(COMMANDS)}")
    parser.add_argument("--repeat", type=int, help="runs of each command on each side (default 3; --quick 2)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the commands (default: inherited)")
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    opts = parser.parse_args(argv)
    names = opts.commands.split(",") if opts.commands else list(QUICK if opts.quick else FULL)
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        parser.error(f"unknown command {', '.join(unknown)}; choose from {', '.join(COMMANDS)}")
    repeat = opts.repeat or (2 if opts.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    checkouts = {"before": opts.before.resolve(), "after": opts.after.resolve()}
    commits = {side: check_checkout(side, path) for side, path in checkouts.items()}
    for path in checkouts.values():  # byte-compile both first: neither side's first run pays for it
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(path / "clbench")], check=True, capture_output=True)
    threads = opts.threads or os.environ.get("OMP_NUM_THREADS", "unset")
    for side in SIDES:
        print(f"{side + ':':<8}{checkouts[side]} at {commits[side]}")
    print(f"{repeat} repetitions per side, sides alternating; OMP_NUM_THREADS={threads}", flush=True)
    times = {n: {side: Times() for side in SIDES} for n in names}
    same: dict[str, bool] = {}
    for rep in range(repeat):
        for name in names:
            order = SIDES if rep % 2 == 0 else SIDES[::-1]
            written = {}
            for side in order:
                wall, cpu, written[side] = run_once(name, checkouts[side], opts.threads)
                times[name][side].wall.append(wall)
                times[name][side].cpu.append(cpu)
                print(f"  {name:<14} {side:<6} rep {rep + 1}: {wall:8.2f} s wall, {cpu:8.2f} s CPU", flush=True)
            if written["before"] or written["after"]:
                same[name] = same.get(name, True) and written["before"] == written["after"]
    header = (f"{'command':<14} {'before s':>9} {'after s':>9} {'ratio':>6} {'fastest':>7}   {'CPU before':>10} "
              f"{'CPU after':>9} {'ratio':>6}   same matrices")
    print(f"\nmedians over {repeat} runs per side\n{header}\n" + "-" * len(header))
    for name in names:
        b, a = times[name]["before"], times[name]["after"]
        print(f"{name:<14} {statistics.median(b.wall):9.2f} {statistics.median(a.wall):9.2f} "
              f"{ratio(a.wall, b.wall):6.3f} {min(a.wall) / min(b.wall):7.3f}   {statistics.median(b.cpu):10.2f} "
              f"{statistics.median(a.cpu):9.2f} "
              f"{ratio(a.cpu, b.cpu):6.3f}   {({True: 'yes', False: 'NO'}.get(same.get(name)) or '-')}")
    if opts.json:
        opts.json.write_text(json.dumps({"commits": commits, "checkouts": {k: str(v) for k, v in checkouts.items()},
                                         "repeat": repeat, "threads": opts.threads,
                                         "commands": {n: COMMANDS[n] for n in names},
                                         "times": {n: {s: vars(t) for s, t in v.items()} for n, v in times.items()},
                                         "same_matrices": same}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
