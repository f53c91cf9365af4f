"""COCO bbox evaluation of a detector over a loader, with pictures of the first batch.

``runner`` is anything with ``module`` (the model: ``(images, padding_mask) -> outputs``),
``device``, ``compute_dtype`` and ``autocast()``: a training ``Strategy``, or a wrapper of a plain
model for inference. Every rank calls ``evaluate(runner)``; the metrics come back on all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import dist
from pipeline.data.collate import model_images
from pipeline.eval.coco import CocoEvaluator
from pipeline.eval.pictures import draw_predictions
from pipeline.eval.postprocess import postprocess_detections


@dataclass
class DetectionEvalConfig:
    """How the detector is evaluated."""

    top_k: int = 100  # detections kept per image (COCO's maxDets is 100)
    pictures: int = 4  # val images saved with predicted boxes drawn (0 = none)
    picture_score: float = 0.3  # boxes drawn above this score

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.pictures < 0:
            raise ValueError("eval.top_k must be >= 1 and eval.pictures >= 0")


def coco_evaluate(loader, annotation_file: Path, focal: bool, eval_cfg: DetectionEvalConfig,
                  pictures_dir: Path | None):
    """evaluate(runner) -> the 12 COCO bbox numbers (same dict on every rank)."""
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
