"""Learning-rate schedules as pure functions of the optimizer step (as nanoGPT's get_lr).

Each returns a factor that multiplies the base lr of every parameter group, so the backbone's
lr multiplier is kept through warmup and decay. A pure function makes resume trivial: the step
alone gives the lr, and tests can check any step without running the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

SCHEDULES = ("cosine", "step", "constant")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp from 1/warmup_steps at step 0 to 1 at step warmup_steps (never 0: step 0 trains)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Half cosine from 1 after warmup down to min_lr_ratio at total_steps (held after)."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_factor(step: int, warmup_steps: int, milestones: Sequence[int], gamma: float) -> float:
    """Multiply by gamma at every milestone already passed (DETR's lr drop)."""
    passed = sum(1 for milestone in milestones if step >= milestone)
    return warmup_factor(step, warmup_steps) * gamma**passed


def lr_factor(
    step: int,
    *,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> float:
    """The lr multiplier at optimizer step `step` (0-based) for the named schedule."""
    if schedule == "cosine":
        return cosine_factor(step, warmup_steps, total_steps, min_lr_ratio)
    if schedule == "step":
        return step_factor(step, warmup_steps, milestones, gamma)
    if schedule == "constant":
        return warmup_factor(step, warmup_steps)
    raise ValueError(f"engine/schedule.py: unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def make_lr_lambda(total_steps: int, **kwargs) -> Callable[[int], float]:
    """`lr_factor` bound to a config, for torch.optim.lr_scheduler.LambdaLR."""
    lr_factor(0, total_steps=total_steps, **kwargs)  # fail now on a bad schedule name

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, **kwargs)

    return factor
