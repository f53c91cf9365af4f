"""Wiring shared by the detection stages (DETR pretraining, domain fine-tuning).

The detector, the set criterion, the task step and the inspector hook shared with the
segmentation stage; COCO evaluation is ``pipeline.eval.detection``. Stages differ in their
inputs (backbone weights vs a whole detector) and freezing policy only.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from PIL import Image

from pipeline import dist
from pipeline.data.collate import model_images
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.shards import load_shard_info
from pipeline.eval.detection import DetectionEvalConfig, coco_evaluate, truth_pixels
from pipeline.eval.segmentation import SegmentationEvalConfig
from pipeline.inference.model_io import ModelSpec
from pipeline.losses.denoising import build_dino_criterion
from pipeline.losses.set_criterion import CriterionConfig, SetCriterion
from pipeline.models import DetectorConfig, build_detector
from stages.common import StageContext, StageParts
from stages.inputs import data_fingerprint

__all__ = ["DetectionEvalConfig", "detection_parts", "inspector_hook", "move_targets",
           "set_prediction_step"]


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


# Unweighted losses logged every step (the mask ones only for segmentation heads).
LOGGED_LOSSES = ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")


def set_prediction_step(criterion: SetCriterion, weights: dict[str, float], freeze_steps: int):
    """batch -> (weighted loss, logged metrics) for detectors and segmenters alike; the backbone
    is frozen for the first ``freeze_steps`` steps."""

    def task_step(strategy, state, batch):
        model = strategy.module.module if hasattr(strategy.module, "module") else strategy.module
        if hasattr(model, "set_backbone_frozen"):
            model.set_backbone_frozen(state.step < freeze_steps)
        images = model_images(batch, strategy.device, strategy.compute_dtype)
        padding_mask = batch["padding_mask"].to(strategy.device)
        targets = move_targets(batch["targets"], strategy.device)
        # DINO's training forward builds its denoising queries from the targets
        extra = {"targets": targets} if getattr(model, "needs_targets", False) else {}
        outputs = strategy.module(images, padding_mask, **extra)
        # Mask logits cover the padded canvas the images were collated on.
        canvas = {"canvas_size": tuple(images.shape[-2:])} if "pred_masks" in outputs else {}
        losses = criterion(outputs, targets, **canvas)
        total = SetCriterion.weighted_total(losses, weights)
        return total, {k: float(v.detach()) for k, v in losses.items() if k in LOGGED_LOSSES}

    return task_step


def _ground_truth(target: dict, model_labels: list[int | None] | None):
    """A val target's objects as the report's GroundTruth: pixels of the resized image, labels in
    the model's space (objects of no model class left out)."""
    from pipeline.inspect.ground_truth import GroundTruth

    truth = truth_pixels([target])[0]
    labels = truth["labels"].long().tolist()
    mapped = labels if model_labels is None else [model_labels[label] for label in labels]
    kept = [i for i, label in enumerate(mapped) if label is not None]
    return GroundTruth(truth["boxes"][kept], torch.tensor([mapped[i] for i in kept], dtype=torch.int64),
                       kept)


def inspector_hook(folder: Path, spec: ModelSpec, criterion_cfg: CriterionConfig,
                   eval_cfg: DetectionEvalConfig | SegmentationEvalConfig,
                   model_labels: list[int | None] | None = None):
    """(model, first val batch) -> the inspector report of its first ``eval.inspect_images``
    images in ``folder`` (rewritten at each evaluation: the last one is the stage's end).

    ``model_labels[label]`` is the model's label of a batch label (None: not a class of the
    model, left out of the report) when the val loader's label space is not the model's; None
    when they are the same."""
    from pipeline.inspect.collect import InspectConfig
    from pipeline.inspect.inspector import InspectInput, inspect_images

    meta = {"config": {"criterion": dataclasses.asdict(criterion_cfg)}}

    def inspect(module, batch: dict) -> None:
        model = module.module if hasattr(module, "module") else module
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            return  # ZeRO-3 partitions the weights: a rank-0-only forward would wait forever
        items = []
        for i, target in enumerate(batch["targets"][:eval_cfg.inspect_images]):
            h, w = (int(v) for v in target["size"])
            image = Image.fromarray(batch["images"][i, :, :h, :w].permute(1, 2, 0).cpu().numpy())
            items.append(InspectInput(f"val_{i:02d}", image, _ground_truth(target, model_labels)))
        device = next(model.parameters()).device
        try:
            inspect_images(model, spec, meta, items, folder,
                           InspectConfig(score_threshold=eval_cfg.picture_score), device)
        except Exception as error:  # a report is a view of training, never a reason to stop it
            logging.getLogger("detrforge.stage").warning(
                "inspector report skipped at this evaluation: %s: %s", type(error).__name__, error)

    return inspect


def detection_parts(ctx: StageContext, env: dist.DistEnv, data: DetectionDataConfig,
                    model_cfg: DetectorConfig, criterion_cfg: CriterionConfig,
                    eval_cfg: DetectionEvalConfig, seed: int, init_from: Path | None) -> StageParts:
    """Loaders, detector (class count read from the data), criterion, task step, evaluation."""
    train_loader = build_detection_loader(data, "train", env.rank, env.world_size, seed)
    val_loader = build_detection_loader(data, "val", env.rank, env.world_size)
    model_cfg = dataclasses.replace(model_cfg, num_classes=train_loader.num_classes)
    model = build_detector(model_cfg)
    focal = model_cfg.focal
    criterion = build_dino_criterion(criterion_cfg, train_loader.num_classes, focal)
    annotations = load_shard_info(Path(data.shards) / "val").annotation_path
    if annotations is None:
        raise FileNotFoundError(f"{data.shards}/val has no annotation file beside its shards; "
                                "convert it with `detrforge data coco-to-shards`")
    names = train_loader.category_map.names
    spec = ModelSpec("detector", model_cfg, names, train_loader.categories, data.eval_size,
                     data.max_size, data.size_divisibility, focal)
    return StageParts(
        model=model, loader=train_loader,
        task_step=set_prediction_step(criterion, criterion_cfg.weights.as_dict(),
                                      model_cfg.backbone.freeze_steps),
        evaluate=coco_evaluate(val_loader, annotations, focal, eval_cfg,
                               ctx.run_dir / "artifacts" / "predictions",
                               inspector_hook(ctx.run_dir / "artifacts" / "inspect", spec,
                                              criterion_cfg, eval_cfg)),
        micro_batch_size=data.batch_size, main_metric="AP",
        images_per_step=data.batch_size * env.world_size,
        meta={"kind": "detector", "detector": dataclasses.asdict(model_cfg),
              "class_names": names, "categories": train_loader.categories,
              "data_fingerprint": data_fingerprint(data.shards)},
        group_of=model.param_group,
        init_from=init_from,
    )
