"""MoE-Adapters' reference autoencoder, isolated: one trained state routed with and without it.

The option changes DDAS's routing; to see that effect alone, this script loads the checkpoint of a run with
``--set moe-adapters.reference_autoencoder=true`` (``resume.safetensors``: the state after the tasks done so
far, kept while the run is unfinished), evaluates every dataset of the embedded default twice, with the
reference autoencoder and with it removed, and prints per dataset the share of test images sent to zero-shot
and the accuracy::

    clbench run --methods moe-adapters --order 1 --out OUT --set moe-adapters.reference_autoencoder=true
    # copy OUT/synthetic-order1/moe-adapters/seed0/resume.safetensors while the run is going, then
    python -m benchmarks.moe_reference_routing CHECKPOINT [--order 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clbench.config import build_config, train_config_for
from clbench.costs.profiler import Profiler
from clbench.engine.harness import dataset_prompts, test_batches
from clbench.engine.runner import build_benchmark, load_model
from clbench.methods import get_method
from clbench.methods.moe_adapters import ZERO_SHOT
from clbench.storage.checkpoint import load_checkpoint


def routed_rows(method, bench, prompt: str, train) -> tuple[list[float], list[float]]:
    """Per dataset: percent of test images DDAS sends to zero-shot, and accuracy (percent)."""
    zero_shot, accuracy = [], []
    with torch.no_grad():
        for task in bench.tasks:
            text = method.eval_text_features(dataset_prompts(task, prompt), task.name)
            correct = total = zero = 0
            for images, labels in test_batches(task, train, torch.device("cpu")):
                logits = method.logits(method.eval_image_features(images, task.name), text, task.name, True)
                zero += int((method._last_routes == ZERO_SHOT).sum())
                correct += int((logits.argmax(-1) == labels).sum())
                total += len(labels)
            zero_shot.append(100 * zero / total)
            accuracy.append(100 * correct / total)
    return zero_shot, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--order", type=int, default=1)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    cfg = build_config("default", {"order": args.order}, ["moe-adapters.reference_autoencoder=true"],
                       ["moe-adapters"])
    model = load_model(cfg, torch.device("cpu"))
    bench = build_benchmark(cfg, model.image_spec)
    cls = get_method("moe-adapters")
    method = cls(model, cls.Hparams(**cfg.methods["moe-adapters"]), Profiler())
    method.setup()
    method.load_state_dict(ckpt.method)
    method.load_extra_state(ckpt.method_extra)
    model.load_state_dict(ckpt.model)
    model.eval()
    train = train_config_for(cfg, "moe-adapters")
    print(f"after {ckpt.completed} tasks ({', '.join(method.tasks)})")
    print(f"{'':36}" + " ".join(f"{t.name[:12]:>12}" for t in bench.tasks))
    reference = method.reference_ae
    for label, ae in (("with the reference AE", reference), ("without", None)):
        method.reference_ae = ae
        zero_shot, accuracy = routed_rows(method, bench, cfg.data.prompt, train)
        print(f"{label + ': zero-shot %':36}" + " ".join(f"{v:12.1f}" for v in zero_shot))
        print(f"{label + ': accuracy':36}" + " ".join(f"{v:12.2f}" for v in accuracy))


if __name__ == "__main__":
    main()
