"""Stage: a detector fine-tuned to a universal segmenter (instance, semantic and panoptic).

The Deformable DETR export of the detection stage (``init_from``) is loaded partially: the pixel
decoder and the mask embedding are new and reported missing; the class head, which grows from
the thing classes to things + stuff, is reported shape-mismatched and starts fresh. Evaluation
gives COCO segm AP (things), PQ / SQ / RQ (all, things, stuff) and mIoU; the main metric is PQ.
Pictures of predicted segments on validation images go to ``<run_dir>/artifacts/segmentation/``,
the inspector report of the first ones (each query's box, points and mask) to
``<run_dir>/artifacts/inspect/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import path_field
from pipeline.data.detection import DetectionDataConfig
from pipeline.data.panoptic_view import PanopticView, build_segmentation_loader, load_panoptic_view
from pipeline.data.shards import load_shard_info
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.strategy import StrategyConfig
from pipeline.eval.segmentation import SegmentationEvalConfig, segmentation_evaluate
from pipeline.inference.model_io import ModelSpec
from pipeline.losses.denoising import build_dino_criterion
from pipeline.losses.masks import MaskLossConfig
from pipeline.losses.set_criterion import CriterionConfig
from pipeline.models.mask_head import SegmenterConfig, build_segmenter
from pipeline.tracking import TrackingConfig
from stages.common import StageContext, StageParts, StageResult, TrainConfig, train_stage
from stages.detection_common import inspector_hook, set_prediction_step
from stages.inputs import data_fingerprint, resolve_init


def _default_criterion() -> CriterionConfig:
    return CriterionConfig(masks=MaskLossConfig())


@dataclass
class Config:
    """Segmentation fine-tuning recipe."""

    data: DetectionDataConfig  # detection shards with instance masks (with_masks is forced on)
    model: SegmenterConfig = field(default_factory=SegmenterConfig)  # detector + mask head (classes from data)
    criterion: CriterionConfig = field(default_factory=_default_criterion)  # matching, box and mask losses
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW + schedule
    strategy: StrategyConfig = field(default_factory=StrategyConfig)  # ZeRO stage, precision
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, rhythm, processes
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    eval: SegmentationEvalConfig = field(default_factory=SegmentationEvalConfig)  # segm AP, PQ, mIoU
    panoptic_annotations: str | None = path_field(default=None)  # folder of panoptic_<split>.json + PNGs; None = <shards>/annotations
    init_from: str | None = path_field(default=None)  # detector (or segmenter) export: path, stage:<name>, models:/...

    def __post_init__(self) -> None:
        if self.criterion.masks is None:
            raise ValueError("criterion.masks must be set for segmentation (a MaskLossConfig mapping)")


def segmenter_labels(loader_categories: list[dict], view: PanopticView) -> list[int | None]:
    """The segmenter's label of each label of a loader read without a view (its labels index the
    shards' categories), by category id: the segmenter's classes are the view's things + stuff."""
    label_of = view.label_of
    return [label_of.get(int(c["id"])) for c in loader_categories]


def segmentation_parts(cfg: Config, ctx: StageContext, env) -> StageParts:
    """Loaders (things + stuff), segmenter (class count from the data), criterion, step, evaluation."""
    data = dataclasses.replace(cfg.data, with_masks=True)
    annotations = Path(cfg.panoptic_annotations or Path(data.shards) / "annotations")
    things = load_shard_info(Path(data.shards) / "train").categories
    train_view = load_panoptic_view(annotations, "train", things)
    val_view = load_panoptic_view(annotations, "val", things)
    train_loader = build_segmentation_loader(data, "train", train_view, env.rank, env.world_size, cfg.train.seed)
    val_loader = build_segmentation_loader(data, "val", None, env.rank, env.world_size)
    num_classes = len(train_view.categories)
    detector = dataclasses.replace(cfg.model.detector, num_classes=num_classes)
    model_cfg = dataclasses.replace(cfg.model, detector=detector)
    criterion = build_dino_criterion(cfg.criterion, num_classes, detector.focal)
    instances = load_shard_info(Path(data.shards) / "val").annotation_path
    model = build_segmenter(model_cfg)
    categories = list(train_view.categories)
    names = [str(c.get("name", c["id"])) for c in categories]
    spec = ModelSpec("segmenter", model_cfg, names, categories, data.eval_size, data.max_size,
                     data.size_divisibility, detector.focal)
    # The val loader reads no view, so its targets are the shards' thing instances: the report's
    # ground-truth rows are things only (stuff carries no instance box; PQ and mIoU score it).
    inspect = inspector_hook(ctx.run_dir / "artifacts" / "inspect", spec, cfg.criterion, cfg.eval,
                             segmenter_labels(val_loader.categories, train_view))
    return StageParts(
        model=model, loader=train_loader,
        task_step=set_prediction_step(criterion, cfg.criterion.weights.as_dict(),
                                         detector.backbone.freeze_steps),
        evaluate=segmentation_evaluate(val_loader, val_view, instances, detector.focal, cfg.eval,
                                       ctx.run_dir / "artifacts" / "segmentation", inspect),
        micro_batch_size=data.batch_size, main_metric="PQ",
        images_per_step=data.batch_size * env.world_size,
        meta={"kind": "segmenter", "segmenter": dataclasses.asdict(model_cfg), "class_names": names,
              "categories": categories, "data_fingerprint": data_fingerprint(data.shards)},
        group_of=model.param_group,
        init_from=resolve_init(cfg.init_from, ctx),
    )


def run(cfg: Config, ctx: StageContext, inputs: dict[str, str] | None = None) -> StageResult:
    """Fine-tune the segmenter, evaluate segm AP, PQ and mIoU on the val split, export."""
    return train_stage(ctx, cfg, cfg.train, cfg.optim, cfg.strategy, cfg.tracking,
                       lambda env: segmentation_parts(cfg, ctx, env), inputs)
