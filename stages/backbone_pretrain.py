"""Stage 1: a timm classifier on classification shards; its export initialises detector backbones.

The export holds the whole classifier's state dict with timm's own keys (``conv1.weight``,
``fc.weight``...), so `pipeline.models.backbone` can load it into a ``features_only`` backbone
(the classifier keys are reported as unexpected and skipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pipeline import dist
from pipeline.config import path_field
from pipeline.data.classification import ClassificationDataConfig, build_classification_loader
from pipeline.data.collate import model_images
from pipeline.data.device_decode import decode_batch_on
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.strategy import StrategyConfig
from pipeline.eval.topk import TopKAccuracy
from pipeline.losses.classification import ClassificationLossConfig, build_classification_loss
from pipeline.tracking import TrackingConfig
from stages.common import StageContext, StageParts, StageResult, TrainConfig, train_stage
from stages.inputs import data_fingerprint, resolve_init


@dataclass
class ClassifierConfig:
    """The timm classifier whose body becomes the detector's backbone."""

    name: str = "resnet50"  # timm model name
    drop_path_rate: float = 0.0  # stochastic depth (ConvNeXt, Swin, ViT recipes use it)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class Config:
    """Backbone pretraining recipe."""

    data: ClassificationDataConfig  # classification shards and augmentation
    model: ClassifierConfig = field(default_factory=ClassifierConfig)  # the classifier
    loss: ClassificationLossConfig = field(default_factory=ClassificationLossConfig)  # its loss
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW + schedule
    strategy: StrategyConfig = field(default_factory=StrategyConfig)  # ZeRO stage, precision
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, rhythm, processes
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    init_from: str | None = path_field(default=None)  # export to start from: path, stage:<name> or models:/<name>@<alias>


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(cfg.name, pretrained=False, num_classes=num_classes,
                             drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs)


def _evaluate(loader):
    def evaluate(strategy) -> dict[str, float]:
        accuracy = TopKAccuracy(ks=(1, 5))
        for batch in loader:
            images = model_images(batch, strategy.device, strategy.compute_dtype)
            with strategy.autocast():
                logits = strategy.module(images)
            accuracy.update(logits.float().cpu(), batch["labels"])
        return accuracy.compute()
    return evaluate


def _parts(cfg: Config, ctx: StageContext, env: dist.DistEnv) -> StageParts:
    train_loader = build_classification_loader(cfg.data, "train", env.rank, env.world_size,
                                               cfg.train.seed)
    val_loader = build_classification_loader(cfg.data, "val", env.rank, env.world_size)
    model = build_classifier(cfg.model, train_loader.num_classes)
    loss_fn = build_classification_loss(cfg.loss)

    def task_step(strategy, state, batch):
        # decode_on: device batches carry JPEG bytes; decoded here, skips counted by the loader
        batch = decode_batch_on(strategy.device, batch, cfg.data.image_size, train_loader.skipped)
        images = model_images(batch, strategy.device, strategy.compute_dtype)
        labels = batch["labels"].to(strategy.device)
        logits = strategy.module(images)
        loss = loss_fn(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"acc1": float(acc)}

    names = [str(c.get("name", c["id"])) for c in train_loader.categories]
    return StageParts(
        model=model, loader=train_loader, task_step=task_step, evaluate=_evaluate(val_loader),
        micro_batch_size=cfg.data.batch_size, main_metric="top1",
        images_per_step=cfg.data.batch_size * env.world_size,
        meta={"kind": "classifier", "timm_name": cfg.model.name, "num_classes": len(names),
              "class_names": names, "image_size": cfg.data.image_size,
              "data_fingerprint": data_fingerprint(cfg.data.shards)},
        init_from=resolve_init(cfg.init_from, ctx),
    )


def run(cfg: Config, ctx: StageContext, inputs: dict[str, str] | None = None) -> StageResult:
    """Train the classifier, evaluate top-1/top-5 on the val split, export."""
    return train_stage(ctx, cfg, cfg.train, cfg.optim, cfg.strategy, cfg.tracking,
                       lambda env: _parts(cfg, ctx, env), inputs)
