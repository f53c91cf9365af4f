"""The loop with the single-process strategy: training, accumulation, the non-finite guard,
the agreed stop, callbacks, and an exact single-process resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from torch import nn

from pipeline.checkpoint import RunFolder, resume, save_checkpoint
from pipeline.dist import DistEnv
from pipeline.engine.callbacks import (
    Callback,
    MetricLogger,
    NonFiniteGuard,
    NonFiniteLossError,
    PeriodicCheckpoint,
    PeriodicEval,
    ProgressBar,
    StopOnRequest,
    stateful_callbacks,
)
from pipeline.engine.loop import EmptyLoaderError, fit
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import StrategyConfig, build_strategy


class Stream:
    """Endless (x, y) batches of regression data; resumable by position."""

    def __init__(self, batch_size: int = 4, seed: int = 0):
        self.batch_size, self.seed, self.position = batch_size, seed, 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.position)
            x = torch.randn(self.batch_size, 3, generator=gen)
            self.position += 1
            yield x, x.sum(dim=1, keepdim=True)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class RecordingTracker:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def make_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def make_strategy(model, grad_accum_steps=1, total_steps=50, lr=1e-2):
    cfg = StrategyConfig(kind="single", precision="fp32", grad_clip=0.0,
                         grad_accum_steps=grad_accum_steps)
    return build_strategy(cfg, model, OptimizerConfig(lr=lr, weight_decay=0.0, schedule="constant"),
                          4, DistEnv(), total_steps=total_steps)


def mse_step(strategy):
    def task_step(batch):
        x, y = batch
        loss = nn.functional.mse_loss(strategy.module(x), y)
        return loss, {"abs_err": float((strategy.module(x) - y).detach().abs().mean())}
    return task_step


def test_fit_trains_and_reports_metrics():
    strategy = make_strategy(make_model())
    tracker = RecordingTracker()
    state = TrainState()
    result = fit(mse_step(strategy), Stream(), strategy, [MetricLogger(tracker, every_steps=10)],
                 state, max_steps=40)
    assert (result.stopped, result.reason, state.step, state.micro_batches) == (False, "max_steps", 40, 40)
    first, last = tracker.logged[0][1]["train/loss"], tracker.logged[-1][1]["train/loss"]
    assert [step for step, _ in tracker.logged] == [10, 20, 30, 40]
    assert last < 0.2 * first
    assert {"train/loss", "train/abs_err", "train/lr", "train/step_time_s",
            "train/nonfinite_losses"} <= set(tracker.logged[0][1])


def test_finite_loader_counts_epochs_and_empty_loader_is_an_error():
    strategy = make_strategy(make_model())
    batches = [(torch.ones(2, 3), torch.ones(2, 1))] * 3
    state = TrainState()
    fit(mse_step(strategy), batches, strategy, [], state, max_steps=7)
    assert state.epoch == 2
    with pytest.raises(EmptyLoaderError, match="no batch"):
        fit(mse_step(strategy), [], strategy, [], TrainState(), max_steps=1)


def test_grad_accumulation_equals_one_big_batch():
    big = make_strategy(make_model())
    fit(mse_step(big), Stream(batch_size=8), big, [], TrainState(), max_steps=3)

    class Halves(Stream):
        def __iter__(self):
            for x, y in Stream(batch_size=8):
                yield x[:4], y[:4]
                yield x[4:], y[4:]

    accumulated = make_strategy(make_model(), grad_accum_steps=2)
    state = TrainState()
    fit(mse_step(accumulated), Halves(), accumulated, [], state, max_steps=3)
    assert (state.step, state.micro_batches) == (3, 6)
    for a, b in zip(big.module.parameters(), accumulated.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def nan_on(batch_numbers, strategy):
    """A task step whose loss is NaN on the given (0-based) micro-batch numbers."""
    calls = {"n": 0}
    base = mse_step(strategy)

    def task_step(batch):
        loss, metrics = base(batch)
        n = calls["n"]
        calls["n"] += 1
        return (loss * float("nan") if n in batch_numbers else loss), metrics
    return task_step


def test_nonfinite_loss_drops_the_batch_without_touching_weights():
    strategy = make_strategy(make_model())
    before = [p.detach().clone() for p in strategy.module.parameters()]
    state = TrainState()
    fit(nan_on({0, 1}, strategy), Stream(), strategy, [NonFiniteGuard(3)], state, max_steps=1)
    assert (state.step, state.micro_batches, state.nonfinite_losses) == (1, 3, 2)
    assert state.consecutive_nonfinite == 0
    reference = make_strategy(make_model())
    stream = Stream()
    stream.position = 2  # the step trained on the third batch only
    fit(mse_step(reference), stream, reference, [], TrainState(), max_steps=1)
    for got, want, old in zip(strategy.module.parameters(), reference.module.parameters(), before):
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, old)


def test_nonfinite_gradient_norm_drops_the_step_without_touching_weights():
    strategy = make_strategy(make_model())
    before = [p.detach().clone() for p in strategy.module.parameters()]
    calls = {"n": 0}

    def poison(grad):  # the loss stays finite; the first backward's gradient does not
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 1 else grad

    first = next(iter(strategy.module.parameters()))
    first.register_hook(poison)
    state = TrainState()
    fit(mse_step(strategy), Stream(), strategy, [NonFiniteGuard(3)], state, max_steps=1)
    assert (state.step, state.micro_batches, state.nonfinite_losses) == (1, 2, 1)
    assert state.consecutive_nonfinite == 0 and math.isfinite(strategy.last_grad_norm)
    reference = make_strategy(make_model())
    stream = Stream()
    stream.position = 1  # the step trained on the second batch only
    fit(mse_step(reference), stream, reference, [], TrainState(), max_steps=1)
    for got, want, old in zip(strategy.module.parameters(), reference.module.parameters(), before):
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, old)


def test_nonfinite_guard_saves_then_raises_after_n_in_a_row():
    strategy = make_strategy(make_model())
    saved = []
    guard = NonFiniteGuard(max_consecutive=3, save=lambda s: saved.append(s.step) or "ckpt")
    state = TrainState()
    with pytest.raises(NonFiniteLossError,
                       match="3 non-finite losses or gradient norms in a row at step 2"):
        fit(nan_on({2, 3, 4, 5}, strategy), Stream(), strategy, [guard], state, max_steps=10)
    assert saved == [2]
    assert state.nonfinite_losses == 3


def test_stop_request_saves_and_returns_stopped():
    strategy = make_strategy(make_model())
    stop = StopOnRequest()

    class RequestAtStep(Callback):
        def on_step_end(self, state, metrics):
            if state.step == 3:
                stop.request()

    saved = []
    state = TrainState()
    result = fit(mse_step(strategy), Stream(), strategy, [RequestAtStep(), stop], state,
                 max_steps=10, save=lambda s: saved.append(s.step))
    assert (result.stopped, result.reason, state.step, saved) == (True, "stop_requested", 3, [3])


def test_stop_file_and_signal_request_a_stop(tmp_path):
    stop_file = tmp_path / "STOP"
    stop = StopOnRequest(stop_file)
    assert not stop.wants_stop(TrainState())
    stop_file.touch()
    assert stop.wants_stop(TrainState())
    by_signal = StopOnRequest()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        by_signal.install_signal_handlers([signal.SIGUSR1])
        os.kill(os.getpid(), signal.SIGUSR1)
        assert by_signal.wants_stop(TrainState())
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_periodic_eval_and_progress_bar_run(capsys):
    strategy = make_strategy(make_model())
    seen = []
    tracker = RecordingTracker()
    evaluate = PeriodicEval(lambda s: seen.append(s.step) or {"mse": 1.0}, every_steps=4,
                            tracker=tracker)
    fit(mse_step(strategy), Stream(), strategy, [evaluate, ProgressBar(10, images_per_step=4)],
        TrainState(), max_steps=10)
    assert seen == [4, 8, 10]
    assert tracker.logged[-1] == (10, {"eval/mse": 1.0})


def _train_with_checkpoints(run_dir, max_steps, die_at=None):
    """Dropout model, checkpoint every 2 steps; `die_at` aborts like a kill after that step."""
    run = RunFolder(run_dir).create()
    loader, state, losses, holder = Stream(), TrainState(), [], {}
    evaluate = PeriodicEval(lambda s: {"step_seen": float(s.step)}, every_steps=3, at_end=False)

    class Record(Callback):
        def on_step_end(self, state, metrics):
            losses.append((state.step, metrics["loss"]))
            if state.step == die_at:
                raise KeyboardInterrupt

    def save(s):
        return save_checkpoint(run, holder["strategy"], s, loader=loader,
                               stateful=stateful_callbacks(callbacks))

    callbacks = [evaluate, PeriodicCheckpoint(save, every_steps=2), Record()]
    model = make_model(dropout=0.3)
    torch.manual_seed(42)
    strategy, outcome = resume(run, model, lambda m: make_strategy(m, total_steps=max_steps),
                               state, loader=loader, stateful=stateful_callbacks(callbacks))
    holder["strategy"] = strategy
    eval_after_resume = dict(evaluate.last)
    try:
        fit(mse_step(strategy), loader, strategy, callbacks, state, max_steps)
    except KeyboardInterrupt:
        pass
    return strategy, outcome, losses, eval_after_resume


def test_single_process_resume_is_exact(tmp_path):
    straight, outcome, straight_losses, _ = _train_with_checkpoints(tmp_path / "a", 9)
    assert outcome.kind == "scratch"
    _, _, first_losses, _ = _train_with_checkpoints(tmp_path / "b", 9, die_at=5)
    resumed, outcome, resumed_losses, eval_after_resume = _train_with_checkpoints(tmp_path / "b", 9)
    assert outcome.kind == "resume" and outcome.path.name == "step_4"
    assert eval_after_resume == {"step_seen": 3.0}  # callback state came back too
    assert [s for s, _ in resumed_losses] == list(range(5, 10))
    assert dict(first_losses) == pytest.approx(dict(straight_losses[:5]))
    assert dict(resumed_losses) == pytest.approx(dict(straight_losses[4:]), rel=1e-6)
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        torch.testing.assert_close(a, b)


def test_ema_callback_tracks_training_and_is_checkpointed(tmp_path):
    from pipeline.engine.ema import EmaConfig, EmaUpdate, ModelEma

    strategy = make_strategy(make_model())
    ema = ModelEma(strategy.module, EmaConfig(enabled=True, decay=0.9, warmup=False))
    start = {k: v.clone() for k, v in ema.shadow.items()}
    callback = EmaUpdate(ema, strategy.module)
    run = RunFolder(tmp_path)
    state = TrainState()
    fit(mse_step(strategy), Stream(), strategy, [callback], state, max_steps=3)
    assert ema.updates == 3
    assert not torch.equal(ema.shadow["0.weight"], start["0.weight"])
    save_checkpoint(run, strategy, state, stateful=stateful_callbacks([callback]))
    restored = EmaUpdate(ModelEma(make_model(), EmaConfig(enabled=True)), make_model())
    resume(run, make_model(), lambda m: make_strategy(m), TrainState(),
           stateful=stateful_callbacks([restored]))
    assert restored.ema.updates == 3
    torch.testing.assert_close(restored.ema.shadow["0.weight"], ema.shadow["0.weight"])


def test_stateful_callbacks_are_keyed_by_name_and_names_must_differ():
    evaluate = PeriodicEval(lambda s: {}, every_steps=1)
    named = stateful_callbacks([MetricLogger(None), evaluate, ProgressBar(3), StopOnRequest()])
    assert named == {"periodic_eval": evaluate}  # stateless callbacks are left out
    second = PeriodicEval(lambda s: {}, every_steps=1)
    with pytest.raises(ValueError, match="named 'periodic_eval'"):
        stateful_callbacks([evaluate, second])
    second.name = "eval_test"
    assert set(stateful_callbacks([evaluate, second])) == {"periodic_eval", "eval_test"}
