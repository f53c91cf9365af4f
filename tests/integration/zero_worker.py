"""Worker for tests/integration/test_zero_resume.py, started under torchrun (2 ranks, gloo).

Trains a small MLP with dropout (so the RNG matters) on a synthetic, resumable batch stream
through `fit`, with the real run folder, resume order and checkpoints. Knobs to misbehave:
--die-at-step kills every rank with SIGKILL after that step; --signal-rank1-at-step asks for a
graceful stop on rank 1 alone (all ranks must agree, save, and exit 0); --nan-rank1-at/-from
give rank 1 alone non-finite losses; --hang-saving-step makes rank 0
hang inside that step's save after the shards are written and before `latest` (the test then
kills the process group).

Writes <run>/losses_rank<r>.jsonl (one {"step", "loss"} per line, appended across launches),
and at the end <run>/export/ and <run>/probe_outputs.pt (the module's outputs on a fixed input).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from pipeline import checkpoint, dist
from pipeline.dist import exit_without_teardown
from pipeline.engine.callbacks import (
    Callback,
    NonFiniteGuard,
    PeriodicCheckpoint,
    StopOnRequest,
    stateful_callbacks,
)
from pipeline.engine.loop import fit
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import StrategyConfig, build_strategy
from pipeline.export import export_strategy

IN_FEATURES, OUT_FEATURES, MICRO_BATCH = 8, 3, 4


def make_model(seed: int = 0) -> nn.Module:
    """The MLP trained here; also rebuilt by the test to load the export."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 32), nn.GELU(), nn.Dropout(0.2), nn.LayerNorm(32),
        nn.Linear(32, OUT_FEATURES),
    )


def probe_input() -> torch.Tensor:
    """A fixed input: (5, IN_FEATURES)."""
    return torch.linspace(-1, 1, 5 * IN_FEATURES).reshape(5, IN_FEATURES)


class SyntheticStream:
    """Endless regression batches; batch i of rank r is a pure function of (seed, r, i)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank, self.position = seed, rank, 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.position)
            x = torch.randn(MICRO_BATCH, IN_FEATURES, generator=gen)
            y = torch.sin(x[:, :OUT_FEATURES] * 2) + 0.1 * torch.randn(MICRO_BATCH, OUT_FEATURES, generator=gen)
            self.position += 1
            yield x, y

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class LossRecorder(Callback):
    def __init__(self, path: Path):
        self.path = path

    def on_step_end(self, state, metrics):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": state.step, "loss": metrics["loss"]}) + "\n")


class DieAtStep(Callback):
    def __init__(self, step: int | None):
        self.step = step

    def on_step_end(self, state, metrics):
        if state.step == self.step:
            dist.barrier()  # both ranks reach the same step, then both die hard
            os.kill(os.getpid(), signal.SIGKILL)


class SignalOneRankAtStep(Callback):
    """Sends SIGUSR1 to this process on one rank only, as a scheduler's preemption notice."""

    def __init__(self, step: int | None, rank: int):
        self.step, self.rank = step, rank

    def on_step_end(self, state, metrics):
        if state.step == self.step and dist.get_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGUSR1)


def hang_while_saving(run: checkpoint.RunFolder, step: int) -> None:
    publish = checkpoint._publish_latest

    def publish_or_hang(run_folder, directory):
        if checkpoint.step_of(directory) == step:
            (run.root / "hanging").write_text("shards written, latest not yet\n")
            while True:
                time.sleep(1)
        publish(run_folder, directory)

    checkpoint._publish_latest = publish_or_hang


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--zero-stage", type=int, required=True)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--die-at-step", type=int)
    parser.add_argument("--hang-saving-step", type=int)
    parser.add_argument("--signal-rank1-at-step", type=int,
                        help="SIGUSR1 to rank 1 only after this step: a graceful stop")
    parser.add_argument("--nan-rank1-at", type=int, help="NaN loss on rank 1 at this micro-batch")
    parser.add_argument("--nan-rank1-from", type=int, help="NaN loss on rank 1 from this micro-batch on")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto")
    args = parser.parse_args()

    env = dist.read_dist_env()
    dist.init_distributed(env, backend=args.backend)
    run = checkpoint.RunFolder(args.run_dir).create()
    if args.hang_saving_step is not None:
        hang_while_saving(run, args.hang_saving_step)
    state = TrainState()
    loader = SyntheticStream(seed=7, rank=env.rank)
    strategy_cfg = StrategyConfig(kind="deepspeed", zero_stage=args.zero_stage, precision=args.precision,
                                  grad_clip=1.0)
    optimizer_cfg = OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=3,
                                    backbone_lr_mult=0.5, schedule="cosine")
    callbacks: list[Callback] = []

    def save(train_state, diverged=False):
        return checkpoint.save_checkpoint(run, strategy, train_state, loader=loader,
                                          stateful=stateful_callbacks(callbacks), keep_last=2,
                                          diverged=diverged)

    stop = StopOnRequest()
    stop.install_signal_handlers([signal.SIGUSR1])
    callbacks += [PeriodicCheckpoint(save, args.save_every),
                  LossRecorder(run.root / f"losses_rank{env.rank}.jsonl"),
                  DieAtStep(args.die_at_step),
                  SignalOneRankAtStep(args.signal_rank1_at_step, rank=1), stop,
                  NonFiniteGuard(max_consecutive=3, save=lambda st: save(st, diverged=True))]

    def make_strategy(model):
        return build_strategy(strategy_cfg, model, optimizer_cfg, MICRO_BATCH, env,
                              total_steps=args.max_steps, group_of=lambda n: "backbone" if n.startswith("0.") else "default")

    model = make_model()
    torch.manual_seed(1234 + env.rank)  # dropout masks differ per rank, as in real training
    strategy, outcome = checkpoint.resume(run, model, make_strategy, state, loader=loader,
                                          stateful=stateful_callbacks(callbacks))
    if dist.is_main():
        print(f"resume: {outcome}", flush=True)

    def task_step(batch):
        x, y = (t.to(strategy.device) for t in batch)
        loss = nn.functional.mse_loss(strategy.module(x), y)
        micro = state.micro_batches  # 1-based, counted before the call
        nan_from = args.nan_rank1_from
        nan_now = micro == args.nan_rank1_at or (nan_from is not None and micro >= nan_from)
        if env.rank == 1 and nan_now:
            loss = loss * float("nan")
        return loss, {}

    result = fit(task_step, loader, strategy, callbacks, state, args.max_steps, save=save)
    if result.stopped:
        print(f"stopped at step {state.step} on request", flush=True)
        dist.shutdown()
        return
    export_strategy(strategy, run.export_dir, {"arch": "mlp", "zero_stage": args.zero_stage})
    strategy.eval()
    with torch.no_grad(), strategy.autocast():
        outputs = strategy.module(probe_input().to(strategy.device)).float().cpu()
    if dist.is_main():
        torch.save(outputs, run.root / "probe_outputs.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)  # the work is saved; see pipeline.dist
