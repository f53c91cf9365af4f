"""Segmentation evaluation over a loader: COCO segm AP and box AP of the box head (things),
PQ / SQ / RQ (all, things, stuff), mIoU and the share of contested panoptic pixels, measured at the original image size against the original panoptic PNGs and json,
with pictures of predicted segments and, through the stage's ``inspect`` hook, the inspector
report of the first validation images.

``runner`` is anything with ``module`` (the model: ``(images, padding_mask) -> outputs``),
``device``, ``compute_dtype`` and ``autocast()``: a training ``Strategy``, or a wrapper of a plain
model for inference. Every rank calls ``evaluate(runner)``; the metrics come back on all ranks.
Every rank runs as many forwards as the rank with the most batches (``evaluation_forwards``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import dist
from pipeline.boxes import box_cxcywh_to_xyxy
from pipeline.data.errors import DataError
from pipeline.data.panoptic_view import PanopticView
from pipeline.eval.coco import CocoEvaluator
from pipeline.eval.lockstep import evaluation_forwards
from pipeline.eval.panoptic import PanopticEvaluator, read_panoptic_png
from pipeline.eval.pictures import draw_segments
from pipeline.eval.segmentation_inference import (
    PanopticInferenceConfig,
    instance_inference,
    panoptic_segments,
    resize_mask_logits,
    semantic_inference,
)
from pipeline.eval.semantic import SemanticEvaluator, panoptic_to_semantic


@dataclass
class SegmentationEvalConfig:
    """How the segmenter is evaluated."""

    top_k: int = 100  # instance predictions kept per image for segm AP
    object_mask_threshold: float = 0.8  # panoptic: queries kept above this class score
    overlap_threshold: float = 0.8  # panoptic: segments kept when this share of their mask is visible
    pictures: int = 4  # val images saved with predicted segments and boxes (0 = none)
    inspect_images: int = 2  # val images in the inspector report written at each evaluation (0 = none)
    picture_score: float = 0.3  # the inspector report's score threshold (its found / low_score verdicts)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.pictures < 0:
            raise ValueError("eval.top_k must be >= 1 and eval.pictures >= 0")
        if self.inspect_images < 0 or not 0.0 <= self.picture_score <= 1.0:
            raise ValueError("eval.inspect_images must be >= 0 and eval.picture_score in [0, 1]")
        PanopticInferenceConfig(self.object_mask_threshold, self.overlap_threshold)  # validates


@dataclass
class SegmentationMetrics:
    """The three evaluators of one evaluation pass."""

    coco: CocoEvaluator | None
    panoptic: PanopticEvaluator
    semantic: SemanticEvaluator
    boxes: CocoEvaluator | None = None  # box AP of the box head's boxes (the same top-k instances)
    contested_pixels: int = 0  # panoptic pixels covered by two or more kept masks
    pixels: int = 0  # panoptic pixels seen

    def summarize(self) -> dict[str, float] | None:
        """Every rank calls it; the dict on the rank that holds the COCO results, else None."""
        self.panoptic.gather()
        self.semantic.gather()
        contested = dist.all_reduce_sum(float(self.contested_pixels))
        pixels = dist.all_reduce_sum(float(self.pixels))
        boxes_main = self.boxes.gather() if self.boxes is not None else True
        main = self.coco.gather() if self.coco is not None else dist.is_main()
        if not (main and boxes_main):
            return None
        metrics = {**self.panoptic.summarize(), **self.semantic.summarize()}
        metrics["contested_share"] = contested / max(pixels, 1.0)
        if self.coco is not None:
            metrics.update({f"segm_{k}": v for k, v in self.coco.summarize().items()})
        if self.boxes is not None:
            metrics.update({f"bbox_{k}": v for k, v in self.boxes.summarize().items()})
        return metrics


def evaluate_image(metrics: SegmentationMetrics, view: PanopticView, logits: torch.Tensor,
                   mask_logits: torch.Tensor, image_id: int, focal: bool, eval_cfg: SegmentationEvalConfig,
                   query_boxes: torch.Tensor | None = None):
    """Add one image's predictions (mask logits at the original size; the box head's (Q, 4) x0,
    y0, x1, y1 boxes at that size, if any) -> (panoptic ids, segments)."""
    label_to_id = [int(c["id"]) for c in view.categories]
    num_things = sum(view.is_thing)
    if metrics.coco is not None:
        instances = instance_inference(logits, mask_logits, focal, eval_cfg.top_k, query_boxes=query_boxes)
        keep = instances["labels"] < num_things  # segm AP is on the instance (thing) annotations
        things = {k: v[keep] for k, v in instances.items()}
        metrics.coco.update([image_id], [things])
        if metrics.boxes is not None and query_boxes is not None:
            metrics.boxes.update([image_id], [{k: things[k] for k in ("scores", "labels", "boxes")}])
    panoptic_cfg = PanopticInferenceConfig(eval_cfg.object_mask_threshold, eval_cfg.overlap_threshold)
    result = panoptic_segments(logits, mask_logits, focal, view.is_thing, panoptic_cfg)
    ids, segments = result.ids, result.segments
    metrics.contested_pixels += result.contested_pixels
    metrics.pixels += ids.numel()
    if image_id not in view.images:
        raise DataError(f"image {image_id} has no entry in the panoptic annotations; regenerate them "
                        "together with the shards")
    png, gt_segments = view.images[image_id]
    gt_ids = read_panoptic_png(png)
    predicted = [{"id": s["id"], "category_id": label_to_id[s["label"]]} for s in segments]
    metrics.panoptic.update(gt_ids, gt_segments, ids, predicted)
    metrics.semantic.update(semantic_inference(logits, mask_logits, focal),
                            panoptic_to_semantic(gt_ids, gt_segments, view.label_of))
    return ids, segments


def segmentation_evaluate(loader, view: PanopticView, instances_json: Path | None, focal: bool,
                          eval_cfg: SegmentationEvalConfig, pictures_dir: Path | None,
                          inspect: Callable[[object, dict], None] | None = None):
    """evaluate(runner) -> PQ/SQ/RQ (all, _th, _st), mIoU, pixel_acc, segm_AP..., bbox_AP...,
    contested_share (all ranks). Rank 0 draws the first batch (the same images at every
    evaluation) and hands the model and that batch to ``inspect`` (the stage's inspector report),
    when given."""
    names = [str(c.get("name", c["id"])) for c in view.categories]
    things = [int(c["id"]) for c in view.categories if c.get("isthing", 1)]

    def evaluate(strategy) -> dict[str, float]:
        coco = CocoEvaluator(instances_json, things, iou_type="segm") if instances_json else None
        boxes = CocoEvaluator(instances_json, things, iou_type="bbox") if instances_json else None
        metrics = SegmentationMetrics(coco, PanopticEvaluator(view.categories), SemanticEvaluator(len(names)),
                                      boxes)
        for index, batch, images, outputs in evaluation_forwards(loader, strategy):
            logits, masks = outputs["pred_logits"].float().cpu(), outputs["pred_masks"].float().cpu()
            boxes_xyxy = box_cxcywh_to_xyxy(outputs["pred_boxes"].float().cpu())
            for i, target in enumerate(batch["targets"]):
                image_masks = resize_mask_logits(masks[i], images.shape[-2:], target["size"], target["orig_size"])
                height, width = (float(v) for v in target["orig_size"])
                query_boxes = boxes_xyxy[i] * torch.tensor([width, height, width, height])
                ids, segments = evaluate_image(metrics, view, logits[i], image_masks, int(target["image_id"]),
                                               focal, eval_cfg, query_boxes)
                if index == 0 and i < eval_cfg.pictures and pictures_dir is not None and dist.is_main():
                    draw_segments(images[i], target["size"], ids, segments, names,
                                  pictures_dir / f"val_{i:02d}.png")
            if index == 0 and inspect is not None and dist.is_main() and eval_cfg.inspect_images:
                inspect(strategy.module, batch)
        result = metrics.summarize()
        return dist.broadcast_object(result) if dist.is_initialized() else result

    return evaluate
