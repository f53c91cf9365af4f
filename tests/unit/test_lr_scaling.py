"""optim.scale_lr_with_batch: lr follows the global batch size linearly, by its root, or not."""

import math

import pytest

from pipeline.engine.optim import OptimizerConfig


@pytest.mark.parametrize("rule, expected", [("none", 1e-4), ("linear", 4e-4), ("sqrt", 2e-4)])
def test_lr_scales_with_the_global_batch(rule, expected):
    cfg = OptimizerConfig(lr=1e-4, scale_lr_with_batch=rule, base_batch_size=16)
    assert math.isclose(cfg.scaled_lr(64), expected)
    scaled = cfg.for_global_batch(64)
    assert math.isclose(scaled.lr, expected) and scaled.scale_lr_with_batch == "none"
    assert math.isclose(cfg.scaled_lr(16), 1e-4)  # the base batch keeps the recipe's lr


def test_scaling_needs_a_base_batch_size():
    with pytest.raises(ValueError, match="base_batch_size"):
        OptimizerConfig(scale_lr_with_batch="linear")


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="scale_lr_with_batch"):
        OptimizerConfig(scale_lr_with_batch="quadratic", base_batch_size=8)
