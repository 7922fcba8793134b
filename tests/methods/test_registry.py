"""Every registered method, as soon as it exists: it builds, trains two tiny tasks, and its state round-trips."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.synthetic import build_synthetic
from clbench.engine.harness import run_sequence
from clbench.methods import get_method, list_methods


@pytest.fixture(scope="module")
def bench_and_model():
    from clbench.models.backbones import load_backbone

    torch.manual_seed(0)
    model = load_backbone("tiny", "none")
    return build_synthetic(1, model.image_spec, train_per_class=2, test_per_class=1, num_tasks=2), model


def test_registry_has_the_suite() -> None:
    expected = {"zeroshot", "finetune", "lora", "keeplora", "keeplora+", "keeplora++", "inflora", "zscl", "loda",
                "lwf", "lwf-vr", "wise-ft", "icarl", "moe-adapters", "diki"}
    assert expected <= set(list_methods())


@pytest.mark.parametrize("name", list_methods())
def test_method_runs_two_tasks_and_round_trips_state(name: str, bench_and_model) -> None:
    bench, base = bench_and_model
    cls = get_method(name)
    assert cls.summary, f"{name} needs a one-line summary for `clbench methods`"
    assert cls.__doc__ and len(cls.__doc__.strip()) > 20, f"{name} needs a docstring"
    torch.manual_seed(0)
    method = cls(copy.deepcopy(base), cls.Hparams(), Profiler())
    train = TrainConfig(epochs=[1], batch_size=8, lr=1e-3, max_steps=2, eval_batch_size=64)
    result = run_sequence(method, bench, train, method.profiler, torch.device("cpu"), seed=0)
    assert len(result.rows) == 2 and all(len(r) == 2 for r in result.rows)
    # no adapter may stay attached after a task: every method evaluates a plain (merged) CLIP, unless it declares
    # that its modules stay at inference (keeps_modules)
    for site in ([] if cls.keeps_modules else method.model.attention_sites()):
        assert all(len(site.module.adapters[p]) == 0 for p in site.module.adapters), f"{name} left adapters"
    state, extra = method.state_dict(), method.extra_state()
    fresh = cls(copy.deepcopy(base), cls.Hparams(), Profiler())
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    fresh.load_extra_state(copy.deepcopy(extra))
    again = fresh.state_dict()
    assert set(again) == set(state)
    for key in state:
        assert torch.equal(again[key], state[key]), f"{name}: state {key} did not round-trip"
    assert fresh.extra_state() == extra
    assert dataclasses.is_dataclass(cls.Hparams())
