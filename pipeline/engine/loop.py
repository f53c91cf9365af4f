"""The one training loop every stage uses.

The stage supplies `task_step(batch) -> (loss, metrics)`: it moves the batch to
`strategy.device`, runs `strategy.module` and its loss. The loop owns the rest: gradient
accumulation, the non-finite guard, callbacks, the agreed stop. It never looks inside a batch.

A non-finite loss on any rank drops that batch on every rank (no backward, no optimizer step)
and the next batch takes its place, so DeepSpeed's accumulation counters and the lr schedule
stay a function of `state.step` alone. A non-finite global gradient norm drops the whole
optimizer step the same way (the strategy skips the update and zeroes the gradients; the
micro-batches of that step are drawn anew). Both count as non-finite events, and the
NonFiniteGuard callback decides when to give up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import dist
from pipeline.engine.callbacks import Callback, SaveFn
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import Strategy

TaskStep = Callable[[Any], tuple[torch.Tensor, Mapping[str, float]]]


class EmptyLoaderError(RuntimeError):
    """The loader yielded no batch at all."""


@dataclass
class FitResult:
    """How `fit` ended."""

    state: TrainState  # the final state (also updated in place)
    stopped: bool  # True when a stop was requested and saved before max_steps
    reason: str  # "max_steps" | "stop_requested"


def _batch_stream(loader: Iterable, state: TrainState) -> Iterator[Any]:
    """Endless batches; each exhausted pass over `loader` counts one epoch."""
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            raise EmptyLoaderError(
                "engine/loop.py: the loader yielded no batch; check the data path and that "
                "the dataset is not smaller than one batch with drop_last"
            )
        state.epoch += 1


def _is_finite_everywhere(loss: torch.Tensor) -> bool:
    """One collective per micro-batch so that every rank takes the same branch."""
    local_bad = not bool(torch.isfinite(loss.detach()).all())
    return not dist.any_rank(local_bad)


def _grad_norm_finite_everywhere(strategy: Strategy) -> bool:
    """The norm is global (equal on every rank); the collective makes the branch agree anyway."""
    return not dist.any_rank(not math.isfinite(strategy.last_grad_norm))


def _count_nonfinite(state: TrainState, callbacks: Sequence[Callback], value: float) -> None:
    state.nonfinite_losses += 1
    state.consecutive_nonfinite += 1
    for callback in callbacks:
        callback.on_nonfinite_loss(state, value)


def _train_one_step(task_step: TaskStep, batches: Iterator[Any], strategy: Strategy,
                    callbacks: Sequence[Callback], state: TrainState) -> dict[str, float]:
    """grad_accum_steps finite micro-batches -> one optimizer step; returns this rank's means."""
    lr = strategy.lr  # the lr this step uses (the schedule moves on in strategy.step)
    started = time.perf_counter()
    sums: dict[str, float] = {}
    done = 0
    while done < strategy.grad_accum_steps:
        batch = next(batches)
        state.micro_batches += 1
        with strategy.autocast():
            loss, metrics = task_step(batch)
        if not _is_finite_everywhere(loss):
            _count_nonfinite(state, callbacks, float(loss.detach().float().mean()))
            continue
        strategy.backward(loss)
        boundary = strategy.step()
        done += 1
        for key, value in {"loss": float(loss.detach()), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        if boundary and not _grad_norm_finite_everywhere(strategy):
            _count_nonfinite(state, callbacks, strategy.last_grad_norm)
            sums, done = {}, 0  # the strategy dropped the step: its micro-batches too
            continue
        if boundary:
            state.consecutive_nonfinite = 0
    means = {key: value / done for key, value in sums.items()}
    means.update(lr=lr, step_time_s=time.perf_counter() - started)
    return means


def fit(
    task_step: TaskStep,
    loader: Iterable,
    strategy: Strategy,
    callbacks: Sequence[Callback],
    state: TrainState,
    max_steps: int,
    *,
    save: SaveFn | None = None,
) -> FitResult:
    """Train from `state.step` up to `max_steps` optimizer steps.

    Args:
        task_step: batch -> (scalar loss tensor, metrics of python floats); same keys every call.
        loader: any iterable of batches; re-iterated when exhausted (state.epoch counts passes).
        strategy: from `build_strategy`; its module is put in train mode here.
        callbacks: hooks, called in order on every rank.
        state: progress, updated in place (resumed by the caller before fit).
        max_steps: total optimizer steps of the run (not the steps left).
        save: `save(state)` writes a checkpoint; called on every rank when a stop is agreed.

    Every rank must call fit with the same max_steps and callbacks. Returns a FitResult.
    """
    if max_steps < 0 or not math.isfinite(max_steps):
        raise ValueError(f"engine/loop.py: max_steps must be >= 0, got {max_steps}")
    strategy.train()
    for callback in callbacks:
        callback.on_fit_start(state)
    batches = _batch_stream(loader, state)
    stopped = False
    while state.step < max_steps:
        metrics = _train_one_step(task_step, batches, strategy, callbacks, state)
        state.step += 1
        for callback in callbacks:
            callback.on_step_end(state, metrics)
        wish = any(callback.wants_stop(state) for callback in callbacks)
        if dist.any_rank(wish) and state.step < max_steps:
            stopped = True
            break
    if stopped and save is not None:
        save(state)
    for callback in callbacks:
        callback.on_fit_end(state, stopped)
    return FitResult(state=state, stopped=stopped, reason="stop_requested" if stopped else "max_steps")
