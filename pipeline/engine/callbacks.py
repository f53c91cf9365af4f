"""Hooks around the loop: logging, evaluation, checkpoints, the non-finite guard, progress and
the graceful stop. Stateful callbacks return their state from `state_dict()`; it is saved in
every checkpoint (as detectron2 checkpoints its hooks), keyed by the callback's `name`
(`stateful_callbacks`).

Every rank calls every hook at the same point, so a hook may run collectives (the metric mean,
a save), and a hook that raises raises on all ranks together.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pipeline import dist
from pipeline.engine.state import TrainState

SaveFn = Callable[[TrainState], Any]


class NonFiniteLossError(RuntimeError):
    """Training produced too many non-finite losses in a row; a checkpoint was saved first."""


class Tracker(Protocol):
    """Anything that records metrics (pipeline.tracking's MLflow tracker, a test double)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class Callback:
    """Base class: every hook does nothing.

    `name` keys the callback's state in a checkpoint: keep it stable across versions.
    """

    name: str = "callback"

    def on_fit_start(self, state: TrainState) -> None:
        """Before the first step (also after a resume)."""

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        """After optimizer step `state.step`; `metrics` are this rank's means over the step."""

    def on_nonfinite_loss(self, state: TrainState, loss: float) -> None:
        """A batch was dropped because its loss was not finite on some rank."""

    def wants_stop(self, state: TrainState) -> bool:
        """Local wish to stop at this step boundary; the loop ORs it over ranks."""
        return False

    def on_fit_end(self, state: TrainState, stopped: bool) -> None:
        """After the last step, or after a requested stop was saved."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""


def _overrides_state(callback: Callback) -> bool:
    return type(callback).state_dict is not Callback.state_dict


def stateful_callbacks(callbacks: Iterable[Callback]) -> dict[str, Callback]:
    """The callbacks that keep state, keyed by `name`: what a checkpoint saves and restores.

    Keying by name (not list position) lets a callback be added or reordered between a save
    and a resume without another callback receiving its state. Stateless callbacks (rank 0's
    progress bar) are left out, so ranks whose lists differ only in those agree.
    """
    named: dict[str, Callback] = {}
    for callback in callbacks:
        if not _overrides_state(callback):
            continue
        if callback.name in named:
            raise ValueError(
                f"engine/callbacks.py: two stateful callbacks are named {callback.name!r}; "
                "give one another name (the `name` argument) so their checkpointed state "
                "cannot be swapped"
            )
        named[callback.name] = callback
    return named


class MetricLogger(Callback):
    """Means over the last `every_steps` steps and over ranks, logged by rank 0 to a tracker."""

    name = "metric_logger"

    def __init__(self, tracker: Tracker | None, every_steps: int = 10, prefix: str = "train/"):
        if every_steps < 1:
            raise ValueError(f"engine/callbacks.py: every_steps must be >= 1, got {every_steps}")
        self.tracker, self.every_steps, self.prefix = tracker, every_steps, prefix
        self._sums: dict[str, float] = {}
        self._count = 0

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if state.step % self.every_steps == 0:
            self.flush(state)

    def flush(self, state: TrainState) -> None:
        """Log what was accumulated (collective: every rank calls it)."""
        if not self._count:
            return
        means = dist.all_reduce_mean_dict({k: v / self._count for k, v in self._sums.items()})
        means["nonfinite_losses"] = float(state.nonfinite_losses)
        if self.tracker is not None and dist.is_main():
            self.tracker.log_metrics({self.prefix + k: v for k, v in means.items()}, state.step)
        self._sums, self._count = {}, 0

    def on_fit_end(self, state: TrainState, stopped: bool) -> None:
        self.flush(state)


class PeriodicEval(Callback):
    """Runs `evaluate(state) -> metrics` every `every_steps` steps and at the end, on every rank
    (evaluation may be distributed); rank 0 logs the result with an "eval/" prefix."""

    name = "periodic_eval"

    def __init__(self, evaluate: Callable[[TrainState], Mapping[str, float]], every_steps: int,
                 tracker: Tracker | None = None, at_end: bool = True, name: str | None = None):
        if every_steps < 1:
            raise ValueError(f"engine/callbacks.py: every_steps must be >= 1, got {every_steps}")
        if name is not None:
            self.name = name  # two evaluations (e.g. of two splits) need two names
        self.evaluate, self.every_steps = evaluate, every_steps
        self.tracker, self.at_end = tracker, at_end
        self.last: dict[str, float] = {}
        self._last_step = -1

    def _run(self, state: TrainState) -> None:
        self.last = {k: float(v) for k, v in self.evaluate(state).items()}
        self._last_step = state.step
        if self.tracker is not None and dist.is_main():
            self.tracker.log_metrics({f"eval/{k}": v for k, v in self.last.items()}, state.step)

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        if state.step % self.every_steps == 0:
            self._run(state)

    def on_fit_end(self, state: TrainState, stopped: bool) -> None:
        if self.at_end and not stopped and self._last_step != state.step:
            self._run(state)

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last, self._last_step = dict(state["last"]), int(state["last_step"])


class PeriodicCheckpoint(Callback):
    """Calls `save(state)` every `every_steps` optimizer steps and at the end of training."""

    name = "periodic_checkpoint"

    def __init__(self, save: SaveFn, every_steps: int, at_end: bool = True):
        if every_steps < 1:
            raise ValueError(f"engine/callbacks.py: every_steps must be >= 1, got {every_steps}")
        self.save, self.every_steps, self.at_end = save, every_steps, at_end

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        if state.step % self.every_steps == 0:
            self.save(state)

    def on_fit_end(self, state: TrainState, stopped: bool) -> None:
        if self.at_end and not stopped:
            self.save(state)  # the save skips a step that is already `latest`


class NonFiniteGuard(Callback):
    """Stops training after `max_consecutive` non-finite losses or gradient norms in a row,
    saving first.

    The loop itself drops every non-finite batch or step (no optimizer update); this guard
    decides when that has gone on long enough to be a diverged run rather than a bad batch.
    `save` must write the state aside (`Checkpointer.save_diverged`: a `diverged_step_<N>`
    folder), never as `latest`: a resume must start from the last good checkpoint, and
    keep-last pruning must not drop good checkpoints for a diverged one.
    """

    name = "nonfinite_guard"

    def __init__(self, max_consecutive: int = 10, save: SaveFn | None = None):
        if max_consecutive < 1:
            raise ValueError(f"engine/callbacks.py: max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.save = max_consecutive, save

    def on_nonfinite_loss(self, state: TrainState, loss: float) -> None:
        if state.consecutive_nonfinite < self.max_consecutive:
            return
        saved = self.save(state) if self.save is not None else None
        raise NonFiniteLossError(
            f"engine/callbacks.py: {state.consecutive_nonfinite} non-finite losses or gradient "
            f"norms in a row at step {state.step} (last {loss}); "
            + (f"diverged state saved aside ({saved}; a rerun resumes from the last good "
               "checkpoint). " if saved is not None else "nothing saved. ")
            + "Lower the lr, raise warmup_steps or grad_clip, or check the data for broken boxes"
        )


class ProgressBar(Callback):
    """tqdm bar on rank 0: step, loss, lr, images/s and the ETA."""

    name = "progress_bar"

    def __init__(self, total_steps: int, images_per_step: int | None = None, every_steps: int = 1):
        self.total_steps, self.images_per_step = total_steps, images_per_step
        self.every_steps = max(1, every_steps)
        self._bar = None
        self._tick = 0.0

    def on_fit_start(self, state: TrainState) -> None:
        if dist.is_main():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=state.step, unit="step",
                             dynamic_ncols=True)
        self._tick = time.perf_counter()

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        if self._bar is None or state.step % self.every_steps:
            return
        now = time.perf_counter()
        postfix = {"loss": f"{metrics.get('loss', float('nan')):.4g}",
                   "lr": f"{metrics.get('lr', float('nan')):.3g}"}
        if self.images_per_step:
            rate = self.images_per_step * self.every_steps / max(now - self._tick, 1e-9)
            postfix["img/s"] = f"{rate:.1f}"
        self._tick = now
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(state.step - self._bar.n)

    def on_fit_end(self, state: TrainState, stopped: bool) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StopOnRequest(Callback):
    """Graceful stop for preemption: set by `request()`, a signal, or a file appearing.

    The flag is local (a signal reaches one rank); the loop agrees on it over all ranks at the
    step boundary, saves, and returns `stopped=True`.
    """

    name = "stop_on_request"

    def __init__(self, stop_file: str | Path | None = None):
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.requested = False

    def request(self) -> None:
        """Ask for a stop at the next step boundary (safe from a signal handler)."""
        self.requested = True

    def install_signal_handlers(self, signals: Iterable[int] = (signal.SIGUSR1,)) -> None:
        """Make each signal in `signals` request a stop instead of killing the process."""
        for signum in signals:
            signal.signal(signum, lambda *_: self.request())

    def wants_stop(self, state: TrainState) -> bool:
        return self.requested or (self.stop_file is not None and self.stop_file.exists())
