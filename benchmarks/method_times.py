"""Wall time of whole ``clbench run``s on the embedded default, each method against plain LoRA, in one process.

    python -m benchmarks.method_times                                  # lora, icarl and the MTIL baselines
    python -m benchmarks.method_times --methods lora,icarl --threads 1

Every method is run by its own ``clbench run`` call (``clbench.cli.app.main``, as :mod:`benchmarks.embedded`) into a
fresh temporary folder (deleted afterwards, so no finished run is reused), on the same order, seed and preset;
the table gives each run's wall time, the process's CPU time over it, and both as ratios to the reference
method's (``--reference``, default ``lora``, always run first). Ratios are read, never asserted: the target of
the MTIL baselines (each within 2x LoRA) is printed beside them. The machine's load average before and after is printed
too, since a shared machine skews single runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_METHODS = ("lora", "icarl", "lwf", "lwf-vr", "wise-ft", "moe-adapters", "diki")
TARGETS = dict.fromkeys(("lwf", "lwf-vr", "icarl", "wise-ft", "moe-adapters", "diki"), 2.0)  # wall <= 2x LoRA


def time_run(method: str, order: int, seed: int, preset: str, threads: int | None) -> tuple[float, float]:
    """Wall and CPU seconds of one ``clbench run --methods METHOD`` into a temporary folder."""
    from clbench.cli.app import main

    out = Path(tempfile.mkdtemp(prefix=f"clbench-times-{method}-"))
    argv = ["run", "--methods", method, "--order", str(order), "--seed", str(seed), "--out", str(out),
            "--preset", preset, "--quiet"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        code = main(argv)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if code not in (0, None):
        raise SystemExit(f"clbench run --methods {method} failed (exit {code})")
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--reference", default="lora")
    parser.add_argument("--order", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (clbench run --threads)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m and m != args.reference]
    print(f"load average before: {os.getloadavg()}; cpus: {os.cpu_count()}; threads: {args.threads}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    times: dict[str, tuple[float, float]] = {}
    for method in [args.reference, *methods]:
        times[method] = time_run(method, args.order, args.seed, args.preset, args.threads)
        print(f"  {method}: {times[method][0]:.1f} s wall, {times[method][1]:.1f} s CPU", flush=True)
    ref_wall, ref_cpu = times[args.reference]
    print(f"\norder {args.order}, seed {args.seed}, preset {args.preset}; ratios to {args.reference}")
    print(f"{'method':<14}{'wall s':>9}{'cpu s':>9}{'wall ratio':>12}{'cpu ratio':>11}  target")
    for method, (wall, cpu) in times.items():
        target = TARGETS.get(method)
        mark = "" if target is None else f"<= {target:g}x: {'met' if wall / ref_wall <= target else 'NOT met'}"
        print(f"{method:<14}{wall:>9.1f}{cpu:>9.1f}{wall / ref_wall:>12.2f}{cpu / ref_cpu:>11.2f}  {mark}")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
