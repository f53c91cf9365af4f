"""LR schedules are pure functions of the step; the scheduler follows them."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.engine.optim import OptimizerConfig, build_optimizer, build_scheduler
from pipeline.engine.schedule import lr_factor


def test_warmup_is_linear_and_never_zero():
    factors = [lr_factor(s, schedule="constant", total_steps=100, warmup_steps=4) for s in range(6)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_goes_from_one_to_min_ratio_and_holds():
    kwargs = dict(schedule="cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(10, **kwargs) == pytest.approx(1.0)
    assert lr_factor(60, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, **kwargs) == pytest.approx(0.1)
    assert lr_factor(500, **kwargs) == pytest.approx(0.1)


@given(st.integers(0, 300), st.integers(0, 50), st.floats(0.0, 1.0))
def test_cosine_is_non_increasing_after_warmup_and_bounded(step, warmup, min_ratio):
    kwargs = dict(schedule="cosine", total_steps=200, warmup_steps=warmup, min_lr_ratio=min_ratio)
    now, later = lr_factor(step, **kwargs), lr_factor(step + 1, **kwargs)
    assert 0.0 <= now <= 1.0 + 1e-12
    if step < warmup:
        assert now > 0.0  # step 0 trains
    if step >= warmup:
        assert min_ratio - 1e-12 <= later <= now + 1e-12


def test_step_schedule_multiplies_by_gamma_at_each_milestone():
    kwargs = dict(schedule="step", total_steps=100, milestones=[10, 20], gamma=0.1)
    assert [lr_factor(s, **kwargs) for s in (0, 9, 10, 19, 20, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_factor(0, schedule="linear", total_steps=10)


def test_scheduler_sets_group_lrs_from_the_pure_function():
    model = torch.nn.Linear(2, 2)
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=2, schedule="cosine")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    for step in range(12):
        expected = 1e-3 * lr_factor(step, total_steps=10, **cfg.schedule_kwargs())
        assert all(math.isclose(g["lr"], expected, rel_tol=1e-9) for g in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
