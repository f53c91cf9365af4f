"""Wiring shared by the detection stages (DETR pretraining, domain fine-tuning).

The detector, the set criterion, the ten-line task step and COCO evaluation with pycocotools
against the val split's original annotation file. Stages differ in their inputs (backbone
weights vs a whole detector) and freezing policy only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipeline import dist
from pipeline.data.collate import model_images
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.shards import load_shard_info
from pipeline.eval.coco import CocoEvaluator
from pipeline.eval.postprocess import postprocess_detections
from pipeline.losses.denoising import build_dino_criterion
from pipeline.losses.set_criterion import CriterionConfig, SetCriterion
from pipeline.models.detr import DetectorConfig, build_detector
from stages.common import StageContext, StageParts
from stages.inputs import data_fingerprint

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@dataclass
class DetectionEvalConfig:
    """How the detector is evaluated."""

    top_k: int = 100  # detections kept per image (COCO's maxDets is 100)
    pictures: int = 4  # val images saved with predicted boxes drawn (0 = none)
    picture_score: float = 0.3  # boxes drawn above this score

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.pictures < 0:
            raise ValueError("eval.top_k must be >= 1 and eval.pictures >= 0")


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def detection_task_step(criterion: SetCriterion, weights: dict[str, float], freeze_steps: int):
    """batch -> (weighted loss, logged metrics); the backbone is frozen for the first steps."""

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
        losses = criterion(outputs, targets)
        total = SetCriterion.weighted_total(losses, weights)
        logged = {k: float(v) for k, v in losses.items() if k in ("loss_ce", "loss_bbox", "loss_giou")}
        return total, logged

    return task_step


def draw_predictions(images: torch.Tensor, sizes: torch.Tensor, detections: list[dict],
                     names: list[str], folder: Path, min_score: float) -> None:
    """Save (B, 3, H, W) normalised images with their detections drawn, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, det) in enumerate(zip(images, detections)):
        h, w = (int(s) for s in sizes[i])
        pixels = ((image.float().cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1) * 255)
        picture = Image.fromarray(pixels[:, :h, :w].byte().permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(picture)
        for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
            if score < min_score:
                continue
            draw.rectangle(box.tolist(), outline=(255, 40, 40), width=2)
            draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{names[int(label)]} {score:.2f}",
                      fill=(255, 255, 0))
        picture.save(folder / f"val_{i:02d}.png")


def coco_evaluate(loader, annotation_file: Path, focal: bool, eval_cfg: DetectionEvalConfig,
                  pictures_dir: Path | None):
    """evaluate(strategy) -> the 12 COCO bbox numbers (same dict on every rank)."""
    category_map = loader.category_map
    label_to_id = [int(c["id"]) for c in category_map.categories]

    def evaluate(strategy) -> dict[str, float]:
        evaluator = CocoEvaluator(annotation_file, label_to_id)
        for index, batch in enumerate(loader):
            images = model_images(batch, strategy.device, strategy.compute_dtype)
            with strategy.autocast():
                outputs = strategy.module(images, batch["padding_mask"].to(strategy.device))
            outputs = {k: outputs[k].float().cpu() for k in ("pred_logits", "pred_boxes")}
            targets = batch["targets"]
            orig = torch.stack([t["orig_size"] for t in targets])
            evaluator.update([int(t["image_id"]) for t in targets],
                             postprocess_detections(outputs, orig, focal, eval_cfg.top_k))
            if index == 0 and pictures_dir is not None and dist.is_main() and eval_cfg.pictures:
                n = eval_cfg.pictures
                sizes = torch.stack([t["size"] for t in targets])
                draw_predictions(images[:n], sizes[:n],
                                 postprocess_detections(outputs, sizes, focal, eval_cfg.top_k)[:n],
                                 category_map.names, pictures_dir, eval_cfg.picture_score)
        metrics = evaluator.summarize() if evaluator.gather() else None
        return dist.broadcast_object(metrics) if dist.is_initialized() else metrics

    return evaluate


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
    return StageParts(
        model=model, loader=train_loader,
        task_step=detection_task_step(criterion, criterion_cfg.weights.as_dict(),
                                      model_cfg.backbone.freeze_steps),
        evaluate=coco_evaluate(val_loader, annotations, focal, eval_cfg,
                               ctx.run_dir / "artifacts" / "predictions"),
        micro_batch_size=data.batch_size, main_metric="AP",
        images_per_step=data.batch_size * env.world_size,
        meta={"kind": "detector", "detector": dataclasses.asdict(model_cfg),
              "class_names": names, "categories": train_loader.categories,
              "data_fingerprint": data_fingerprint(data.shards)},
        group_of=model.param_group,
        init_from=init_from,
    )
