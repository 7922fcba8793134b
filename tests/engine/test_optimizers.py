"""The training loop's optimiser choice (``train.optimizer``): each one's trajectory on a 1-d quadratic against
the update rule worked out by hand, the paper preset's recipes for InfLoRA and LoDA, and the recorded config."""

from __future__ import annotations

import math

import pytest
import torch
from method_probes import ordered_ctx, styled_task
from torch import Tensor, nn

from clbench.config import TrainConfig, build_config, method_run_config, train_config_for
from clbench.costs.profiler import Profiler
from clbench.engine.harness import Hooks, train_task
from clbench.errors import UserError
from clbench.methods.base import Method


class Quadratic(Method):
    """One scalar weight w with loss ½·(w − 3)², so the gradient is w − 3; records w after each step."""

    def __init__(self, model) -> None:
        super().__init__(model, None, Profiler())
        self.w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        self.seen: list[float] = []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.w]

    def loss(self, images: Tensor, labels: Tensor, task) -> Tensor:
        return 0.5 * ((self.w - 3) ** 2).sum()

    def after_step(self, task, step: int) -> None:
        self.seen.append(float(self.w.detach()))


def _trajectory(tiny_model, **train) -> list[float]:
    method = Quadratic(tiny_model)
    ctx = ordered_ctx(styled_task("A", 0, classes=2, per_class=2), 0, 1, steps=3, batch_size=1)
    train_task(method, ctx, TrainConfig(schedule="constant", **train), Hooks(), "fp32")
    return method.seen


def test_sgd_uses_momentum_and_coupled_weight_decay(tiny_model) -> None:
    lr, mu, wd = 0.1, 0.9, 0.05
    w, buf, expected = 1.0, None, []
    for _ in range(3):  # heavy ball: g = ∇ + wd·w, b = μ·b + g (b = g at first), w -= lr·b
        g = (w - 3) + wd * w
        buf = g if buf is None else mu * buf + g
        w -= lr * buf
        expected.append(w)
    assert _trajectory(tiny_model, optimizer="sgd", lr=lr, momentum=mu, weight_decay=wd) == pytest.approx(expected)
    plain = _trajectory(tiny_model, optimizer="sgd", lr=lr, momentum=0.0, weight_decay=wd)
    assert plain[1] != pytest.approx(expected[1])  # momentum matters from the second step


def test_adam_adds_the_decay_to_the_gradient_and_adamw_decouples_it(tiny_model) -> None:
    lr, wd, b1, b2, eps = 0.1, 0.05, 0.9, 0.999, 1e-8

    def by_hand(decoupled: bool) -> list[float]:
        w, m, v, out = 1.0, 0.0, 0.0, []
        for t in range(1, 4):
            g = (w - 3) + (0.0 if decoupled else wd * w)
            if decoupled:
                w *= 1 - lr * wd
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            w -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
            out.append(w)
        return out

    assert _trajectory(tiny_model, optimizer="adam", lr=lr, weight_decay=wd) == pytest.approx(by_hand(False))
    assert _trajectory(tiny_model, optimizer="adamw", lr=lr, weight_decay=wd) == pytest.approx(by_hand(True))
    assert by_hand(False)[-1] != pytest.approx(by_hand(True)[-1])


def test_unknown_optimizer_is_a_one_line_error() -> None:
    with pytest.raises(UserError, match="train.optimizer='lion' is not allowed; choose one of adamw, adam, sgd"):
        build_config("smoke", {}, ["train.optimizer=lion"], ["lora"])


def test_paper_preset_recipes_of_inflora_and_loda_are_recorded() -> None:
    cfg = build_config("paper", {}, [], ["inflora", "loda", "keeplora"])
    inflora, loda, keeplora = (train_config_for(cfg, m) for m in ("inflora", "loda", "keeplora"))
    assert (inflora.optimizer, inflora.lr, inflora.weight_decay, inflora.schedule, inflora.warmup_steps) == (
        "adam", 5e-4, 0.0, "coda_cosine", 0)  # InfLoRA's code: Adam 5e-4, wd 0, CODA-Prompt's cosine
    assert (loda.optimizer, loda.momentum, loda.lr, loda.weight_decay, loda.schedule) == (
        "sgd", 0.9, 0.005, 5e-4, "cosine")  # LoDA's code: SGD m0.9, wd 5e-4, cosine
    assert (keeplora.optimizer, keeplora.schedule) == ("adamw", "onecycle")  # the others keep AdamW
    recorded = method_run_config(cfg, "loda")["train"]
    assert (recorded["optimizer"], recorded["momentum"], recorded["lr"]) == ("sgd", 0.9, 0.005)
