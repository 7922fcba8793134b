"""How learnable is each embedded domain on its own? Trains every domain alone, from the pretrained tiny backbone,
with the chosen methods and preset, and prints zero-shot → after-training accuracy per domain.

This is the quick probe behind the embedded design (item 1 of ``benchmarks/embedded.py``, plasticity): a domain
that a method cannot learn alone will not be learnt inside the sequence either, and one run here takes seconds
per domain instead of minutes per sequence. Usage::

    python -m benchmarks.embedded_domains                                   # finetune and lora, default preset
    python -m benchmarks.embedded_domains --domains Shapes,Digits --set data.train_per_class=40
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from clbench.config import build_config, train_config_for
    from clbench.costs.profiler import Profiler
    from clbench.datasets import synthetic
    from clbench.datasets.base import Benchmark
    from clbench.engine.harness import run_sequence
    from clbench.engine.runner import load_model
    from clbench.methods import get_method

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="finetune,lora")
    parser.add_argument("--domains", default=",".join(synthetic.ORDERS[1]))
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", nargs="*", default=[], help="key=value settings, as clbench run --set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    cfg = build_config(args.preset, {"order": 1, "seed": args.seed}, args.set, methods)
    device = torch.device("cpu")
    base = load_model(cfg, device)
    for domain in args.domains.split(","):
        task = synthetic.build_domain(domain, base.image_spec, cfg.data.train_per_class, cfg.data.test_per_class,
                                      cfg.data.seed)
        cells = [domain]
        for name in methods:
            started = time.time()
            cls = get_method(name)
            method = cls(copy.deepcopy(base), cls.Hparams(**cfg.methods[name]), Profiler(device=device))
            result = run_sequence(method, Benchmark("synthetic", 1, [task]), train_config_for(cfg, name),
                                  method.profiler, device, args.seed)
            cells.append(f"{name}: {result.zeroshot[0]:.0f} -> {result.rows[0][0]:.0f} "
                         f"({time.time() - started:.0f} s)")
        print(" | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
