"""Worker for tests/integration/test_dino_dist.py, started under torchrun (2 ranks, gloo).

A tiny DINO trained for a few steps under DeepSpeed ZeRO with the real strategy and loop; rank 1's
batches hold no box at all (no denoising queries there), rank 0's do. Every parameter must get a
gradient on both ranks, or the gradient reduction waits forever. Writes
<run>/done_rank<r>.json with the step reached and the last loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline import dist
from pipeline.engine.loop import fit
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import StrategyConfig, build_strategy
from pipeline.losses import CriterionConfig, LossWeights, SetCriterion
from pipeline.losses.denoising import build_dino_criterion
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.denoising import DenoisingConfig

SIDE, MICRO_BATCH = 64, 2


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(DetectorConfig(
        kind="dino", num_classes=2, num_queries=6, hidden_dim=32, num_feature_levels=3, enc_layers=1,
        dec_layers=2, nheads=2, enc_n_points=2, dec_n_points=2, dim_feedforward=64, dropout=0.0,
        two_stage=True, box_refine=True, denoising=DenoisingConfig(dn_number=8), train_query_groups=2,
        backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True)))


class Batches:
    """Endless batches; rank 1's targets are all empty."""

    def __init__(self, rank: int):
        self.rank, self.position = rank, 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.rank * 1000 + self.position)
            self.position += 1
            images = torch.randn(MICRO_BATCH, 3, SIDE, SIDE, generator=gen)
            if self.rank == 1:
                targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * MICRO_BATCH
            else:
                targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])},
                           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
            yield images, targets

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    env = dist.read_dist_env()
    dist.init_distributed(env, backend="gloo")
    model = make_model()
    strategy = build_strategy(StrategyConfig(kind="deepspeed", zero_stage=args.zero_stage, precision="fp32",
                                             grad_clip=0.1),
                              model, OptimizerConfig(lr=1e-4), MICRO_BATCH, env, total_steps=args.steps)
    criterion = build_dino_criterion(CriterionConfig(), num_classes=2, focal=True)
    last = {}

    def task_step(batch):
        images, targets = batch
        images = images.to(strategy.device)
        outputs = strategy.module(images, torch.zeros(images.shape[0], SIDE, SIDE, dtype=torch.bool,
                                                      device=strategy.device), targets=targets)
        losses = criterion(outputs, targets)
        total = SetCriterion.weighted_total(losses, LossWeights())
        last["loss"] = float(total.detach())
        return total, {}

    state = TrainState()
    fit(task_step, Batches(env.rank), strategy, [], state, args.steps)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / f"done_rank{env.rank}.json").write_text(json.dumps({"step": state.step, **last}))
    dist.shutdown()


if __name__ == "__main__":
    main()
    dist.exit_without_teardown(0)  # the work is saved; see pipeline.dist
