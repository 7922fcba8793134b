"""Learning-rate schedules: the rate each optimiser step uses, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from clbench.config import TrainConfig
from clbench.engine.schedules import build_scheduler, warmup_cosine_lr


def _optimizer(*lrs: float) -> torch.optim.AdamW:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.AdamW(groups, lr=lrs[0], weight_decay=0.0)


def _rates(train: TrainConfig, total: int, *lrs: float) -> tuple[list[list[float]], list[float]]:
    """The rates of every group at each of ``total`` steps (as the harness runs them), and after the last."""
    opt = _optimizer(*lrs)
    sched = build_scheduler(opt, train, total)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if sched is not None:
            sched.step()
    return seen, [g["lr"] for g in opt.param_groups]


def test_cosine_warms_up_linearly_then_decays_to_zero() -> None:
    seen, after = _rates(TrainConfig(schedule="cosine", warmup_steps=4), 10, 1e-5)
    lr = [row[0] for row in seen]
    # warm-up: lr·(s+1)/4 for s = 0..3, reaching the peak at the last warm-up step
    assert lr[:4] == pytest.approx([2.5e-6, 5e-6, 7.5e-6, 1e-5], rel=1e-12)
    # cosine over the remaining 6 steps: s=4 is the peak again, s=5 is cos(π/6), s=7 is halfway
    assert lr[4] == pytest.approx(1e-5, rel=1e-12)
    assert lr[5] == pytest.approx(0.5 * (1 + math.sqrt(3) / 2) * 1e-5, rel=1e-12)
    assert lr[7] == pytest.approx(5e-6, rel=1e-12)
    # the last step (s=9) is cos(5π/6); after it the rate is 0 (ZSCL's extra, no-op iteration)
    assert lr[9] == pytest.approx(0.5 * (1 - math.sqrt(3) / 2) * 1e-5, rel=1e-12)
    assert after == [0.0]
    assert lr[4:] == sorted(lr[4:], reverse=True)


def test_cosine_with_zscls_settings() -> None:
    """ZSCL's MTIL run: 1000 iterations, 100 warm-up steps, lr 1e-5."""
    seen, after = _rates(TrainConfig(schedule="cosine", warmup_steps=100), 1000, 1e-5)
    lr = [row[0] for row in seen]
    assert lr[0] == pytest.approx(1e-7, rel=1e-12)
    assert lr[49] == pytest.approx(5e-6, rel=1e-12)
    assert max(lr) == pytest.approx(1e-5, rel=1e-12) and lr[99] == lr[100] == max(lr)
    assert lr[550] == pytest.approx(5e-6, rel=1e-12)  # (550 − 100)/900 = ½: halfway down
    assert lr[999] == pytest.approx(0.5 * (1 + math.cos(math.pi * 899 / 900)) * 1e-5, rel=1e-9)
    assert 0 < lr[999] < 1e-10 and after == [0.0]


def test_cosine_schedules_each_group_from_its_own_rate() -> None:
    seen, _ = _rates(TrainConfig(schedule="cosine", warmup_steps=3), 8, 1e-5, 5e-5)
    assert [row[1] for row in seen] == pytest.approx([5 * row[0] for row in seen], rel=1e-12)
    assert seen[0] == pytest.approx([1e-5 / 3, 5e-5 / 3], rel=1e-12)
    assert max(row[1] for row in seen) == pytest.approx(5e-5, rel=1e-12)


def test_cosine_without_warm_up_starts_at_the_peak() -> None:
    seen, _ = _rates(TrainConfig(schedule="cosine", warmup_steps=0), 4, 2e-3)
    assert [row[0] for row in seen] == pytest.approx([2e-3, (1 + math.sqrt(0.5)) * 1e-3, 1e-3,
                                                     (1 - math.sqrt(0.5)) * 1e-3], rel=1e-12)


def test_warm_up_longer_than_the_task_is_cut_short() -> None:
    seen, _ = _rates(TrainConfig(schedule="cosine", warmup_steps=10), 4, 1e-3)
    assert [row[0] for row in seen] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4], rel=1e-12)
    assert warmup_cosine_lr(1e-3, 10, 10, 4) == 0.0  # past the end: 0, never a division by zero


def test_onecycle_is_pytorchs_onecycle_with_each_groups_rate_as_peak() -> None:
    train = TrainConfig(schedule="onecycle")
    seen, _ = _rates(train, 20, 1e-3, 5e-3)
    opt = _optimizer(1e-3, 5e-3)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3, 5e-3], total_steps=20)
    expected = []
    for _ in range(20):
        expected.append([g["lr"] for g in opt.param_groups])
        opt.step()
        ref.step()
    assert seen == expected
    # PyTorch defaults: start at peak/25, peak after 30% of the steps, end at peak/25/1e4
    assert seen[0] == pytest.approx([1e-3 / 25, 5e-3 / 25], rel=1e-12)
    assert max(row[0] for row in seen) == pytest.approx(1e-3, rel=1e-12)
    assert seen[-1] == pytest.approx([1e-3 / 25 / 1e4, 5e-3 / 25 / 1e4], rel=1e-9)


def test_constant_has_no_scheduler() -> None:
    seen, after = _rates(TrainConfig(schedule="constant"), 5, 3e-4, 1e-5)
    assert build_scheduler(_optimizer(1e-3), TrainConfig(schedule="constant"), 5) is None
    assert seen == [[3e-4, 1e-5]] * 5 and after == [3e-4, 1e-5]


def test_unknown_schedule_is_refused() -> None:
    train = TrainConfig()
    train.schedule = "linear"  # bypasses config validation on purpose
    with pytest.raises(ValueError, match="linear"):
        build_scheduler(_optimizer(1e-3), train, 5)


def test_coda_cosine_is_inflora_codes_quarter_cosine() -> None:
    # InfLoRA's CosineSchedule: lr·cos(99π·e/(200(K−1))); with K = 3: angles 0°, 44.55°, 89.1°
    seen, _ = _rates(TrainConfig(schedule="coda_cosine"), 3, 5e-4, 1e-3)
    expected = [math.cos(math.radians(a)) for a in (0.0, 44.55, 89.1)]
    assert [row[0] for row in seen] == pytest.approx([5e-4 * f for f in expected], rel=1e-12)
    assert [row[1] for row in seen] == pytest.approx([1e-3 * f for f in expected], rel=1e-12)
    assert seen[-1][0] == pytest.approx(7.854e-6, rel=1e-3)  # ≈ 1.6 % of the peak at the end, not 0
    single, _ = _rates(TrainConfig(schedule="coda_cosine"), 1, 5e-4)
    assert single == [[5e-4]]
