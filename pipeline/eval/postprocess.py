"""Detector outputs -> scored boxes in absolute image coordinates, ready for COCO evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.boxes import box_cxcywh_to_xyxy


def _check_inputs(outputs: dict, target_sizes: Tensor, top_k: int) -> None:
    logits, boxes = outputs.get("pred_logits"), outputs.get("pred_boxes")
    if logits is None or boxes is None or logits.dim() != 3 or boxes.shape != logits.shape[:2] + (4,):
        raise ValueError("postprocess_detections: outputs need 'pred_logits' (B, Q, C) and "
                         "'pred_boxes' (B, Q, 4)")
    if target_sizes.shape != (logits.shape[0], 2):
        raise ValueError(f"postprocess_detections: target_sizes must be (B, 2) = ({logits.shape[0]}, 2)"
                         f" rows of (h, w), got {tuple(target_sizes.shape)}")
    if top_k < 1:
        raise ValueError(f"postprocess_detections: top_k must be >= 1, got {top_k}")


def _top_k_focal(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Q, C) logits -> scores, labels, query index (B, k): best (query, class) pairs overall."""
    num_classes = logits.shape[-1]
    prob = logits.sigmoid().flatten(1)  # (B, Q*C)
    scores, flat_idx = prob.topk(min(top_k, prob.shape[1]), dim=1)
    return scores, flat_idx % num_classes, flat_idx // num_classes


def _top_k_softmax(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Q, C+1) logits -> scores, labels, query index (B, k): best class per query, best queries."""
    per_query_scores, per_query_labels = logits.softmax(-1)[..., :-1].max(-1)  # no-object dropped
    scores, query_idx = per_query_scores.topk(min(top_k, per_query_scores.shape[1]), dim=1)
    return scores, per_query_labels.gather(1, query_idx), query_idx


@torch.no_grad()
def postprocess_detections(outputs: dict, target_sizes: Tensor, focal: bool,
                           top_k: int = 100) -> list[dict[str, Tensor]]:
    """Top-scoring detections of each image, boxes scaled to ``target_sizes``.

    Args:
        outputs: {"pred_logits": (B, Q, C) focal / (B, Q, C+1) softmax, "pred_boxes": (B, Q, 4)
            cx, cy, w, h normalised}.
        target_sizes: (B, 2) (h, w) per image; the original size for COCO evaluation.
        focal: sigmoid scores with top-k over all (query, class) pairs, as Deformable-DETR (a query
            may appear with several classes); else softmax without no-object, one class per query.
        top_k: detections kept per image (fewer when Q*C or Q is smaller).

    Returns:
        B dicts {"scores": fp32 (k,) descending, "labels": int64 (k,), "boxes": fp32 (k, 4) absolute
        x0, y0, x1, y1 pixels, "queries": int64 (k,) the query each detection comes from}.
    """
    _check_inputs(outputs, target_sizes, top_k)
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    scores, labels, query_idx = (_top_k_focal if focal else _top_k_softmax)(logits, top_k)
    boxes_xyxy = box_cxcywh_to_xyxy(boxes).gather(1, query_idx[..., None].expand(-1, -1, 4))
    img_h, img_w = target_sizes.to(boxes_xyxy).unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # (B, 4)
    boxes_abs = boxes_xyxy * scale[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": b, "queries": q}
            for s, lab, b, q in zip(scores, labels, boxes_abs, query_idx)]


@torch.no_grad()
def postprocess_masks(pred_masks: Tensor, detections: list[dict[str, Tensor]], image_sizes: Tensor,
                      target_sizes: Tensor, canvas_size: tuple[int, int],
                      threshold: float = 0.5) -> list[dict[str, Tensor]]:
    """Add "masks" bool (k, h, w) at ``target_sizes`` to each image's detections.

    Args:
        pred_masks: (B, Q, h_m, w_m) mask logits covering the padded canvas.
        detections: from postprocess_detections (their "queries" pick the masks); updated in place.
        image_sizes: (B, 2) (h, w) of each image inside the canvas (the "size" after augmentation).
        target_sizes: (B, 2) (h, w) to resize to; the original size for COCO evaluation.
        canvas_size: (H, W) of the padded batch ("images".shape[-2:]).
        threshold: probability above which a pixel belongs to the mask.
    """
    if pred_masks.dim() != 4 or len(pred_masks) != len(detections):
        raise ValueError(f"postprocess_masks: pred_masks must be (B, Q, h, w) with B = {len(detections)}, "
                         f"got {tuple(pred_masks.shape)}")
    for i, detection in enumerate(detections):
        logits = pred_masks[i, detection["queries"]].float()[None]  # (1, k, h_m, w_m)
        logits = F.interpolate(logits, size=tuple(canvas_size), mode="bilinear", align_corners=False)
        height, width = (int(v) for v in image_sizes[i])
        logits = logits[..., :height, :width]  # drop the padding before resizing
        out_size = tuple(int(v) for v in target_sizes[i])
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        detection["masks"] = logits[0].sigmoid() > threshold
    return detections
