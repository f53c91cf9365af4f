"""Stage 2: Deformable-DETR (or single-scale DETR) on COCO-style detection shards.

The backbone starts from a stage-1 export (``backbone_init``) or any local timm checkpoint
(``model.backbone.weights``); ``model.backbone.freeze_steps`` keeps it frozen for the first
steps while the randomly initialised transformer settles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.config import path_field
from pipeline.data.detection import DetectionDataConfig
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.strategy import StrategyConfig
from pipeline.eval.detection import DetectionEvalConfig
from pipeline.losses.set_criterion import CriterionConfig
from pipeline.models.detr import DetectorConfig
from pipeline.run_folder import WEIGHTS_FILE
from pipeline.tracking import TrackingConfig
from stages.common import StageContext, StageResult, TrainConfig, train_stage
from stages.detection_common import detection_parts
from stages.inputs import resolve_init


@dataclass
class Config:
    """Detector pretraining recipe."""

    data: DetectionDataConfig  # detection shards and DETR's multi-scale augmentation
    model: DetectorConfig = field(default_factory=DetectorConfig)  # detector (class count from data)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)  # matching and loss weights
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW + schedule
    strategy: StrategyConfig = field(default_factory=StrategyConfig)  # ZeRO stage, precision
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, rhythm, processes
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    eval: DetectionEvalConfig = field(default_factory=DetectionEvalConfig)  # COCO evaluation
    backbone_init: str | None = path_field(default=None)  # stage-1 export for the backbone: path, stage:<name>, models:/...
    init_from: str | None = path_field(default=None)  # whole-detector export to start from (resume order 2)


def run(cfg: Config, ctx: StageContext, inputs: dict[str, str] | None = None) -> StageResult:
    """Train the detector, evaluate COCO bbox AP on the val split, export."""

    def parts(env):
        model_cfg = cfg.model
        backbone_export = resolve_init(cfg.backbone_init, ctx)
        if backbone_export is not None:
            backbone = dataclasses.replace(model_cfg.backbone,
                                           weights=str(backbone_export / WEIGHTS_FILE))
            model_cfg = dataclasses.replace(model_cfg, backbone=backbone)
        return detection_parts(ctx, env, cfg.data, model_cfg, cfg.criterion, cfg.eval,
                               cfg.train.seed, resolve_init(cfg.init_from, ctx))

    return train_stage(ctx, cfg, cfg.train, cfg.optim, cfg.strategy, cfg.tracking, parts, inputs)
