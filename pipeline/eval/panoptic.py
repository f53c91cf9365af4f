"""Panoptic quality (Kirillov et al. 2019): PQ = SQ x RQ for all, thing and stuff categories.

Follows the COCO panoptic API's rules (``panopticapi/evaluation.py``):
- a predicted and a ground-truth segment of the same category match when IoU > 0.5 (so matches
  are unique); the union leaves out the predicted pixels that fall on ground-truth void (id 0);
- crowd ground-truth segments are never matched and count as no false negative;
- an unmatched prediction is not a false positive when more than half of it lies on void or on a
  crowd region of its own category;
- PQ_c = sum of matched IoU / (TP + FP / 2 + FN / 2); categories with no TP, FP or FN are left
  out of the means.

Usage::

    evaluator = PanopticEvaluator(categories)           # COCO dicts with "id" and "isthing"
    evaluator.update(gt_map, gt_segments, pred_map, pred_segments)   # per image, (H, W) ids
    evaluator.gather()                                  # sums the counts over ranks
    metrics = evaluator.summarize()                     # {"PQ", "SQ", "RQ", "PQ_th", ..., "PQ_st", ...}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

VOID = 0
OFFSET = 256 * 256 * 256  # ids are < 2^24 (three 8-bit channels), so gt * OFFSET + pred is unique
MATCH_IOU = 0.5


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic PNG -> (H, W) int64 segment ids (R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """(H, W) int64 segment ids of a COCO panoptic PNG."""
    return rgb_to_id(np.asarray(Image.open(path).convert("RGB")))


def load_panoptic_json(path: str | Path) -> dict:
    """The COCO panoptic json, with a clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic annotation file {path} does not exist; the sample data "
                                "writes annotations/panoptic_<split>.json (`detrforge data make-samples`)")
    return json.loads(path.read_text())


def _as_numpy(ids: np.ndarray | torch.Tensor) -> np.ndarray:
    if torch.is_tensor(ids):
        ids = ids.cpu().numpy()
    return np.asarray(ids, dtype=np.int64)


def _areas(ids: np.ndarray) -> dict[int, int]:
    labels, counts = np.unique(ids, return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist()))


class PanopticEvaluator:
    """Accumulates per-category TP, FP, FN and matched IoU over images (see the module docstring)."""

    def __init__(self, categories: Sequence[dict]):
        if not categories:
            raise ValueError("PanopticEvaluator needs the categories (dicts with 'id' and 'isthing')")
        self.category_ids = [int(c["id"]) for c in categories]
        self.isthing = {int(c["id"]): bool(c.get("isthing", 1)) for c in categories}
        self._row = {cid: i for i, cid in enumerate(self.category_ids)}
        # columns: matched IoU sum, TP, FP, FN (float64 so that one all-reduce sums them)
        self.stats = np.zeros((len(self.category_ids), 4), dtype=np.float64)
        self.num_images = 0

    def _check_segments(self, segments: Sequence[dict], ids: dict[int, int], which: str) -> dict[int, dict]:
        table = {}
        for segment in segments:
            sid, cat = int(segment["id"]), int(segment["category_id"])
            if cat not in self._row:
                raise ValueError(f"PanopticEvaluator: {which} segment {sid} has category {cat}, not among "
                                 f"the evaluator's categories {self.category_ids}")
            if sid == VOID:
                raise ValueError(f"PanopticEvaluator: {which} segment id 0 is reserved for void pixels")
            table[sid] = {"category_id": cat, "iscrowd": int(segment.get("iscrowd", 0)), "area": ids.get(sid, 0)}
        unknown = set(ids) - set(table) - {VOID}
        if unknown:
            raise ValueError(f"PanopticEvaluator: {which} map has segment ids {sorted(unknown)[:5]} without "
                             "a segments_info entry")
        return table

    def update(self, gt_ids: np.ndarray | torch.Tensor, gt_segments: Sequence[dict],
               pred_ids: np.ndarray | torch.Tensor, pred_segments: Sequence[dict]) -> None:
        """Add one image: (H, W) ground-truth and predicted segment id maps (0 = void) and their
        segments_info lists ({"id", "category_id", optional "iscrowd"})."""
        gt_ids, pred_ids = _as_numpy(gt_ids), _as_numpy(pred_ids)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"PanopticEvaluator.update: prediction {pred_ids.shape} and ground truth "
                             f"{gt_ids.shape} differ in size; resize the prediction to the original image")
        gt = self._check_segments(gt_segments, _areas(gt_ids), "ground-truth")
        pred = self._check_segments(pred_segments, _areas(pred_ids), "predicted")
        overlaps = _areas(gt_ids * OFFSET + pred_ids)
        matched_gt, matched_pred = self._match(gt, pred, overlaps)
        self._count_unmatched(gt, pred, overlaps, matched_gt, matched_pred)
        self.num_images += 1

    def _match(self, gt: dict, pred: dict, overlaps: dict[int, int]) -> tuple[set, set]:
        matched_gt, matched_pred = set(), set()
        for label, intersection in overlaps.items():
            gt_id, pred_id = divmod(label, OFFSET)
            if gt_id not in gt or pred_id not in pred:
                continue
            g, p = gt[gt_id], pred[pred_id]
            if g["iscrowd"] or g["category_id"] != p["category_id"]:
                continue
            on_void = overlaps.get(VOID * OFFSET + pred_id, 0)
            union = p["area"] + g["area"] - intersection - on_void
            iou = intersection / union
            if iou > MATCH_IOU:
                row = self._row[g["category_id"]]
                self.stats[row, 0] += iou
                self.stats[row, 1] += 1
                matched_gt.add(gt_id)
                matched_pred.add(pred_id)
        return matched_gt, matched_pred

    def _count_unmatched(self, gt: dict, pred: dict, overlaps: dict[int, int], matched_gt: set,
                         matched_pred: set) -> None:
        crowd_of_category = {g["category_id"]: gid for gid, g in gt.items() if g["iscrowd"]}
        for gt_id, g in gt.items():
            if gt_id not in matched_gt and not g["iscrowd"]:
                self.stats[self._row[g["category_id"]], 3] += 1
        for pred_id, p in pred.items():
            if pred_id in matched_pred or p["area"] == 0:
                continue
            ignored = overlaps.get(VOID * OFFSET + pred_id, 0)
            crowd = crowd_of_category.get(p["category_id"])
            if crowd is not None:
                ignored += overlaps.get(crowd * OFFSET + pred_id, 0)
            if ignored / p["area"] > MATCH_IOU:
                continue
            self.stats[self._row[p["category_id"]], 2] += 1

    def gather(self) -> None:
        """Sum the counts of every rank (no-op without torch.distributed); all ranks get the sums."""
        if dist.is_available() and dist.is_initialized():
            stats = torch.from_numpy(np.append(self.stats.reshape(-1), self.num_images))
            dist.all_reduce(stats)
            self.stats = stats[:-1].numpy().reshape(self.stats.shape)
            self.num_images = int(stats[-1])

    def per_category(self) -> dict[int, dict[str, float]]:
        """{category id: {"PQ", "SQ", "RQ", "TP", "FP", "FN"}} for categories that occur."""
        result = {}
        for cid, (iou, tp, fp, fn) in zip(self.category_ids, self.stats):
            if tp + fp + fn == 0:
                continue
            denominator = tp + 0.5 * fp + 0.5 * fn
            result[cid] = {"PQ": iou / denominator, "SQ": iou / tp if tp else 0.0,
                           "RQ": tp / denominator, "TP": tp, "FP": fp, "FN": fn}
        return result

    def summarize(self) -> dict[str, float]:
        """{"PQ", "SQ", "RQ"} over all categories, "_th" over things, "_st" over stuff, in
        percent as the COCO panoptic API prints them; 0 for a group with no occurring category."""
        per_category = self.per_category()
        metrics = {}
        for suffix, keep in (("", lambda c: True), ("_th", lambda c: self.isthing[c]),
                             ("_st", lambda c: not self.isthing[c])):
            values = [v for c, v in per_category.items() if keep(c)]
            for name in ("PQ", "SQ", "RQ"):
                metrics[name + suffix] = 100.0 * float(np.mean([v[name] for v in values])) if values else 0.0
        return metrics
