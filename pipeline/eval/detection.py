"""COCO bbox evaluation of a detector over a loader, with pictures of the first batch.

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
from pipeline.eval.coco import CocoEvaluator
from pipeline.eval.lockstep import evaluation_forwards
from pipeline.eval.pictures import draw_truth_and_predictions
from pipeline.eval.postprocess import postprocess_detections


@dataclass
class DetectionEvalConfig:
    """How the detector is evaluated."""

    top_k: int = 100  # detections kept per image (COCO's maxDets is 100)
    pictures: int = 4  # val images saved with ground truth | top predictions drawn (0 = none)
    picture_score: float = 0.3  # predictions below this score are drawn thin (still drawn)
    picture_top_k: int = 10  # predictions drawn per picture, by score
    inspect_images: int = 2  # val images in the inspector report written at each evaluation (0 = none)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.pictures < 0:
            raise ValueError("eval.top_k must be >= 1 and eval.pictures >= 0")
        if self.picture_top_k < 1 or self.inspect_images < 0:
            raise ValueError("eval.picture_top_k must be >= 1 and eval.inspect_images >= 0")


def truth_pixels(targets: list[dict]) -> list[dict]:
    """Targets' normalised cx, cy, w, h boxes -> {"boxes" (n, 4) xyxy pixels of the resized
    image, "labels"}."""
    out = []
    for t in targets:
        h, w = (float(v) for v in t["size"])
        scale = torch.tensor([w, h, w, h])
        out.append({"boxes": box_cxcywh_to_xyxy(t["boxes"].float()) * scale, "labels": t["labels"]})
    return out


def coco_evaluate(loader, annotation_file: Path, focal: bool, eval_cfg: DetectionEvalConfig,
                  pictures_dir: Path | None, inspect: Callable[[object, dict], None] | None = None):
    """evaluate(runner) -> the 12 COCO bbox numbers (same dict on every rank). Rank 0 draws the
    first batch (the same images at every evaluation) and hands the model and that batch to
    ``inspect`` (the stage's inspector report), when given."""
    category_map = loader.category_map
    label_to_id = [int(c["id"]) for c in category_map.categories]

    def evaluate(strategy) -> dict[str, float]:
        evaluator = CocoEvaluator(annotation_file, label_to_id)
        for index, batch, images, outputs in evaluation_forwards(loader, strategy):
            outputs = {k: outputs[k].float().cpu() for k in ("pred_logits", "pred_boxes")}
            targets = batch["targets"]
            orig = torch.stack([t["orig_size"] for t in targets])
            evaluator.update([int(t["image_id"]) for t in targets],
                             postprocess_detections(outputs, orig, focal, eval_cfg.top_k))
            if index == 0 and pictures_dir is not None and dist.is_main() and eval_cfg.pictures:
                n = eval_cfg.pictures
                sizes = torch.stack([t["size"] for t in targets])
                draw_truth_and_predictions(
                    images[:n], sizes[:n], truth_pixels(targets[:n]),
                    postprocess_detections(outputs, sizes, focal, eval_cfg.top_k)[:n],
                    category_map.names, pictures_dir, eval_cfg.picture_score, eval_cfg.picture_top_k)
            if index == 0 and inspect is not None and dist.is_main() and eval_cfg.inspect_images:
                inspect(strategy.module, batch)
        metrics = evaluator.summarize() if evaluator.gather() else None
        return dist.broadcast_object(metrics) if dist.is_initialized() else metrics

    return evaluate
