"""Semantic segmentation metrics: mean IoU and pixel accuracy from a confusion matrix.

IoU_c = TP_c / (TP_c + FP_c + FN_c) over the pixels whose ground truth is not ``ignore_index``;
classes absent from both the ground truth and the prediction have no IoU and are left out of
the mean (the mmsegmentation / detectron2 convention).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

IGNORE_INDEX = 255


class SemanticEvaluator:
    """Accumulates a (C, C) confusion matrix (rows: ground truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"SemanticEvaluator: num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"SemanticEvaluator: ignore_index {ignore_index} is a class label in "
                             f"[0, {num_classes}); use a value outside that range (e.g. 255)")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor | np.ndarray, gt: Tensor | np.ndarray) -> None:
        """Add one image or a batch: integer labels of the same shape, e.g. (H, W) or (B, H, W)."""
        pred, gt = torch.as_tensor(pred).cpu().long(), torch.as_tensor(gt).cpu().long()
        if pred.shape != gt.shape:
            raise ValueError(f"SemanticEvaluator.update: prediction {tuple(pred.shape)} and ground truth "
                             f"{tuple(gt.shape)} differ in shape")
        keep = gt != self.ignore_index
        pred, gt = pred[keep], gt[keep]
        if len(gt) and (int(gt.min()) < 0 or int(gt.max()) >= self.num_classes):
            raise ValueError(f"SemanticEvaluator.update: ground-truth labels must lie in [0, {self.num_classes}) "
                             f"or equal ignore_index {self.ignore_index}")
        if len(pred) and (int(pred.min()) < 0 or int(pred.max()) >= self.num_classes):
            raise ValueError(f"SemanticEvaluator.update: predicted labels must lie in [0, {self.num_classes})")
        counts = torch.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2)
        self.confusion += counts.view(self.num_classes, self.num_classes)

    def gather(self) -> None:
        """Sum the confusion matrices of every rank (no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion)

    def iou_per_class(self) -> Tensor:
        """(C,) float64 IoU per class, NaN for classes absent from ground truth and prediction."""
        confusion = self.confusion.double()
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def summarize(self) -> dict[str, float]:
        """{"mIoU", "pixel_acc"} in percent (0 when nothing was counted)."""
        iou = self.iou_per_class()
        valid = ~iou.isnan()
        total = int(self.confusion.sum())
        return {
            "mIoU": 100.0 * float(iou[valid].mean()) if bool(valid.any()) else 0.0,
            "pixel_acc": 100.0 * float(self.confusion.diag().sum()) / total if total else 0.0,
        }


def panoptic_to_semantic(ids: np.ndarray, segments: list[dict], label_of: dict[int, int],
                         ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) panoptic segment ids + segments_info -> (H, W) int64 class labels; void (0), crowd
    segments and categories missing from ``label_of`` become ``ignore_index``."""
    semantic = np.full(ids.shape, ignore_index, dtype=np.int64)
    for segment in segments:
        category = int(segment["category_id"])
        if segment.get("iscrowd", 0) or category not in label_of:
            continue
        semantic[ids == int(segment["id"])] = label_of[category]
    return semantic
