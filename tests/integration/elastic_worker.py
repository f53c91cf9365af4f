"""Worker for tests/integration/test_elastic_resume.py, started under torchrun (gloo).

A small MLP under DeepSpeed ZeRO trained through `fit` and the real checkpoint module, with the
same global batch on any number of ranks: batch i of the run is GLOBAL_BATCH rows drawn from
(seed, i); each of W ranks takes its 1/W of the rows. Every step therefore has the same
gradient whatever the world size, and a run resumed on another number of ranks must end with
the weights of the uninterrupted one, which only holds when the optimizer state (AdamW's
moments, ZeRO-partitioned) and the schedule are carried over for the new world.

--phase save: 2 ranks train to --save-step, save, go on to --max-steps and write
<run>/reference.pt (the consolidated weights). --phase resume: resume(elastic=True) on this
world, train to --max-steps and write <run>/resumed.pt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from pipeline import checkpoint, dist
from pipeline.dist import exit_without_teardown
from pipeline.engine.loop import fit
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import StrategyConfig, build_strategy

IN_FEATURES, OUT_FEATURES, GLOBAL_BATCH = 8, 3, 8


class GlobalBatchStream:
    """This rank's rows of global batch i, for i = position, position + 1, ..."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.position = rank, world_size, 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(1000 + self.position)
            x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=gen)
            y = torch.sin(x[:, :OUT_FEATURES] * 2)
            rows = GLOBAL_BATCH // self.world_size
            self.position += 1
            yield x[self.rank * rows:(self.rank + 1) * rows], y[self.rank * rows:(self.rank + 1) * rows]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def load_resharded_state_dict(self, states: list[dict]) -> None:
        self.position = int(states[0]["position"])  # global batches: the same on every rank


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, 32), nn.GELU(), nn.LayerNorm(32),
                         nn.Linear(32, OUT_FEATURES))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--phase", choices=["save", "resume"], required=True)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--save-step", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=6)
    args = parser.parse_args()

    env = dist.read_dist_env()
    dist.init_distributed(env, backend="gloo")
    run = checkpoint.RunFolder(args.run_dir).create()
    loader = GlobalBatchStream(env.rank, env.world_size)
    state = TrainState()

    def make_strategy(model):
        return build_strategy(
            StrategyConfig(zero_stage=args.zero_stage, precision="fp32", grad_clip=1.0), model,
            OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2, backbone_lr_mult=0.5),
            GLOBAL_BATCH // env.world_size, env, total_steps=args.max_steps,
            group_of=lambda name: "backbone" if name.startswith("0.") else "default")

    def task_step(batch):
        x, y = (t.to(strategy.device) for t in batch)
        return nn.functional.mse_loss(strategy.module(x), y), {}

    if args.phase == "save":
        strategy = make_strategy(make_model())
        fit(task_step, loader, strategy, [], state, args.save_step)
        checkpoint.save_checkpoint(run, strategy, state, loader=loader)
        out = "reference.pt"
    else:
        strategy, outcome = checkpoint.resume(run, make_model(), make_strategy, state,
                                              loader=loader, elastic=True)
        if dist.is_main():
            print(f"resume: {outcome} at step {state.step}, lr {strategy.lr:.6g}", flush=True)
        out = "resumed.pt"
    fit(task_step, loader, strategy, [], state, args.max_steps)
    weights = strategy.consolidated_state_dict()
    if dist.is_main():
        torch.save(weights, run.root / out)
    dist.shutdown()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)  # the work is saved; see pipeline.dist
