"""The evaluation of tests/faults/test_eval_uneven.py: ``eval_worker.py SHARDS OUT``.

Under torchrun (2 ranks, gloo on CPU): a tiny deformable detector under DeepSpeed ZeRO-3
evaluates ``SHARDS/val`` with the stage's ``coco_evaluate``, one image per batch, so an odd
number of images gives the ranks different batch counts. Rank 0 writes the metrics to OUT.
The test runs ``evaluate_plain`` in its own process for the single-process reference.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline import dist
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.strategy import StrategyConfig, build_strategy
from pipeline.eval.detection import DetectionEvalConfig, coco_evaluate
from pipeline.models import BackboneConfig, DetectorConfig, build_detector


def make_model(num_classes: int) -> torch.nn.Module:
    """The same weights in every process (seeded)."""
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(
        kind="deformable", num_classes=num_classes, num_queries=100, hidden_dim=32,
        num_feature_levels=3, enc_layers=1, dec_layers=2, nheads=2, enc_n_points=2, dec_n_points=2,
        dim_feedforward=64, dropout=0.0,
        backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True)))
    with torch.no_grad():  # boxes of the objects' size (a quarter of the side): some AP above 0
        for name, bias in model.named_parameters():
            if name.startswith("bbox_embed.") and name.endswith("layers.2.bias"):
                bias[2:] = math.log(0.25 / 0.75)
    return model


def val_loader(shards: Path, rank: int, world_size: int):
    cfg = DetectionDataConfig(shards=str(shards), batch_size=1, num_workers=0, eval_size=64,
                              max_size=96)
    return build_detection_loader(cfg, "val", rank, world_size)


def evaluate_with(runner, loader) -> dict[str, float]:
    evaluate = coco_evaluate(loader, loader.info.annotation_path, True,
                             DetectionEvalConfig(pictures=0, inspect_images=0), None)
    runner.eval()
    with torch.no_grad():
        return evaluate(runner)


def evaluate_plain(shards: Path) -> dict[str, float]:
    """The reference: the same weights, one process, no DeepSpeed."""
    loader = val_loader(shards, 0, 1)
    model = make_model(loader.num_classes)
    runner = SimpleNamespace(module=model, device=torch.device("cpu"), eval=model.eval,
                             compute_dtype=torch.float32, autocast=nullcontext)
    return evaluate_with(runner, loader)


def main() -> None:
    shards, out = Path(sys.argv[1]), Path(sys.argv[2])
    env = dist.read_dist_env()
    dist.init_distributed(env, backend="gloo")
    loader = val_loader(shards, env.rank, env.world_size)
    strategy = build_strategy(StrategyConfig(kind="deepspeed", zero_stage=3, precision="fp32"),
                              make_model(loader.num_classes), OptimizerConfig(lr=1e-4), 1, env,
                              total_steps=1)
    metrics = evaluate_with(strategy, loader)
    if env.rank == 0:
        out.write_text(json.dumps(metrics))
    dist.shutdown()


if __name__ == "__main__":
    main()
    dist.exit_without_teardown(0)  # the work is saved; see pipeline.dist
