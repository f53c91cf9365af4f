"""Box format conversions, areas, IoU and generalized IoU.

Formats: ``cxcywh`` (centre x, centre y, width, height; DETR's prediction format, normalised to
[0, 1]), ``xyxy`` (corners) and ``xywh`` (COCO json: top-left corner, width, height). All functions
work on the last dimension and keep the leading ones.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x0, y0, x1, y1."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) x0, y0, x1, y1 -> (..., 4) cx, cy, w, h."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) COCO x, y, w, h -> (..., 4) x0, y0, x1, y1."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """(..., 4) x0, y0, x1, y1 -> (..., 4) COCO x, y, w, h."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area; degenerate boxes have area 0, never negative."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of (..., N, 4) and (..., M, 4) xyxy boxes -> IoU (..., N, M) and union
    (..., N, M); leading dims (e.g. a batch of images) pair up."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    # A union of 0 (two empty boxes) would give NaN; such pairs have IoU 0.
    return inter / union.clamp(min=1e-12), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of (..., N, 4) and (..., M, 4) xyxy
    -> (..., N, M), leading dims paired as in ``box_iou``.

    Values lie in [-1, 1]. Degenerate boxes (x1 < x0) are tolerated rather than asserted on,
    because early in training predicted boxes can be anything: they get a low GIoU, not a crash.
    """
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=1e-12)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(N, H, W) bool masks -> (N, 4) xyxy pixel boxes (exclusive max edge); empty masks give 0s."""
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), device=masks.device)
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    big = torch.tensor(1e9, device=masks.device)
    x0 = torch.where(cols, xs, big).amin(dim=1)
    y0 = torch.where(rows, ys, big).amin(dim=1)
    x1 = torch.where(cols, xs + 1, -big).amax(dim=1)
    y1 = torch.where(rows, ys + 1, -big).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return torch.where(masks.flatten(1).any(1)[:, None], boxes, torch.zeros_like(boxes))
