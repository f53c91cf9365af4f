"""Stage 3: a pretrained detector carried to a new domain (new classes, new imagery).

The detector export is loaded partially: the class head, whose shape follows the new class count,
is reported as shape-mismatched and keeps its fresh initialisation; everything else is loaded.
``freeze`` picks what stays fixed while the new head learns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.config import path_field
from pipeline.data.detection import DetectionDataConfig
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.strategy import StrategyConfig
from pipeline.eval.detection import DetectionEvalConfig
from pipeline.losses.set_criterion import CriterionConfig
from pipeline.models.detr import DetectorConfig
from pipeline.tracking import TrackingConfig
from stages.common import StageContext, StageResult, TrainConfig, train_stage
from stages.detection_common import detection_parts
from stages.inputs import resolve_init

FREEZE_POLICIES = ("none", "backbone", "backbone+encoder")


@dataclass
class Config:
    """Domain fine-tuning recipe."""

    data: DetectionDataConfig  # the new domain's detection shards
    # The detector export: path, stage:<name> or models:/<name>@<alias>; null trains from scratch
    # (a baseline). Required, so that a recipe says which.
    init_from: str | None = path_field()
    model: DetectorConfig = field(default_factory=DetectorConfig)  # must match the export's architecture
    criterion: CriterionConfig = field(default_factory=CriterionConfig)  # matching and loss weights
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW + schedule
    strategy: StrategyConfig = field(default_factory=StrategyConfig)  # ZeRO stage, precision
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, rhythm, processes
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    eval: DetectionEvalConfig = field(default_factory=DetectionEvalConfig)  # COCO evaluation
    freeze: str = "none"  # "none" | "backbone" | "backbone+encoder": parameters kept fixed

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_POLICIES:
            raise ValueError(f"freeze must be one of {FREEZE_POLICIES}, got {self.freeze!r}")


def apply_freeze(model: nn.Module, policy: str) -> int:
    """requires_grad=False on the frozen part (before the optimizer is built); returns its size."""
    prefixes = {"none": (), "backbone": ("backbone.",),
                "backbone+encoder": ("backbone.", "input_proj.", "transformer.encoder.")}[policy]
    frozen = 0
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def run(cfg: Config, ctx: StageContext, inputs: dict[str, str] | None = None) -> StageResult:
    """Fine-tune the detector on the new domain, evaluate COCO bbox AP, export."""

    def parts(env):
        built = detection_parts(ctx, env, cfg.data, cfg.model, cfg.criterion, cfg.eval,
                                cfg.train.seed, resolve_init(cfg.init_from, ctx))
        apply_freeze(built.model, cfg.freeze)
        return built

    return train_stage(ctx, cfg, cfg.train, cfg.optim, cfg.strategy, cfg.tracking, parts, inputs)
