"""Segmenter outputs of one image -> instance, semantic or panoptic predictions (MaskFormer's
inference rules, Cheng et al. 2021/2022).

Inputs per image: class logits (Q, C) sigmoid/focal or (Q, C + 1) softmax with no-object last,
and mask logits (Q, H, W) already at the output resolution (``resize_mask_logits``). Labels are
the model's contiguous class indices; map them to dataset category ids outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.boxes import masks_to_boxes


@dataclass
class PanopticInferenceConfig:
    """Thresholds of MaskFormer's panoptic inference."""

    object_mask_threshold: float = 0.8  # queries kept above this class score (MaskFormer: 0.8)
    overlap_threshold: float = 0.8  # a segment is dropped when under this share of its mask is visible
    mask_threshold: float = 0.5  # mask probability above which a pixel belongs to a query's mask

    def __post_init__(self) -> None:
        for name in ("object_mask_threshold", "overlap_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PanopticInferenceConfig.{name} must lie in [0, 1], got {getattr(self, name)}")


def class_probabilities(logits: Tensor, focal: bool) -> Tensor:
    """(Q, C) sigmoid or (Q, C + 1) softmax logits -> (Q, C) foreground class probabilities."""
    return logits.float().sigmoid() if focal else logits.float().softmax(-1)[..., :-1]


def resize_mask_logits(mask_logits: Tensor, canvas_size: Sequence[int], image_size: Sequence[int],
                       out_size: Sequence[int]) -> Tensor:
    """(Q, h, w) logits over the padded canvas -> (Q, *out_size): upsampled to the canvas, cropped
    to the unpadded ``image_size`` (h, w), resized to ``out_size`` (e.g. the original image)."""
    logits = F.interpolate(mask_logits.float()[None], size=tuple(int(v) for v in canvas_size),
                           mode="bilinear", align_corners=False)
    logits = logits[..., : int(image_size[0]), : int(image_size[1])]
    return F.interpolate(logits, size=tuple(int(v) for v in out_size), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def instance_inference(logits: Tensor, mask_logits: Tensor, focal: bool, top_k: int = 100,
                       mask_threshold: float = 0.5, query_boxes: Tensor | None = None) -> dict[str, Tensor]:
    """Top-k (query, class) pairs -> {"scores" (k,) descending, "labels" (k,), "masks" bool (k, H, W),
    "boxes" (k, 4) x0, y0, x1, y1 pixels, "mask_boxes" (k, 4) the masks' tight boxes, "queries" (k,)}.

    Score = class probability x mean mask probability inside the predicted mask (Mask2Former),
    so that queries with confident classes but vague masks rank lower. "boxes" are the box head's
    ``query_boxes`` (Q, 4) x0, y0, x1, y1 pixels of the output size when given (one model gives
    boxes and masks), else the masks' boxes.
    """
    probs = class_probabilities(logits, focal)  # (Q, C)
    num_classes = probs.shape[1]
    scores, flat = probs.flatten().topk(min(top_k, probs.numel()))
    queries, labels = flat // num_classes, flat % num_classes
    mask_probs = mask_logits[queries].float().sigmoid()
    masks = mask_probs > mask_threshold
    mask_score = (mask_probs * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
    scores, order = (scores * mask_score).sort(descending=True)
    masks = masks[order]
    mask_boxes = masks_to_boxes(masks) if len(masks) else torch.zeros(0, 4, device=masks.device)
    queries = queries[order]
    boxes = mask_boxes if query_boxes is None else query_boxes[queries].float()
    return {"scores": scores, "labels": labels[order], "masks": masks, "boxes": boxes,
            "mask_boxes": mask_boxes, "queries": queries}


@torch.no_grad()
def semantic_inference(logits: Tensor, mask_logits: Tensor, focal: bool) -> Tensor:
    """(H, W) int64 class per pixel: argmax over classes of sum_q p(class | q) * p(pixel in q)."""
    scores = torch.einsum("qc,qhw->chw", class_probabilities(logits, focal), mask_logits.float().sigmoid())
    return scores.argmax(0)


@dataclass
class PanopticResult:
    """One image's panoptic prediction."""

    ids: Tensor  # (H, W) int64 segment id, 0 = void
    segments: list[dict] = field(default_factory=list)  # {"id", "label", "isthing", "score"}
    contested_pixels: int = 0  # pixels inside the masks of two or more kept queries (resolved by score)


@torch.no_grad()
def panoptic_inference(logits: Tensor, mask_logits: Tensor, focal: bool, is_thing: Sequence[bool],
                       cfg: PanopticInferenceConfig | None = None) -> tuple[Tensor, list[dict]]:
    """``panoptic_segments`` -> ((H, W) int64 segment ids, 0 = void; segments_info list)."""
    result = panoptic_segments(logits, mask_logits, focal, is_thing, cfg)
    return result.ids, result.segments


@torch.no_grad()
def panoptic_segments(logits: Tensor, mask_logits: Tensor, focal: bool, is_thing: Sequence[bool],
                      cfg: PanopticInferenceConfig | None = None) -> PanopticResult:
    """Non-overlapping segments: segment ids, segments_info list of {"id", "label", "isthing",
    "score"} and the count of contested pixels.

    Queries above ``object_mask_threshold`` compete per pixel by score x mask probability; a
    query keeps the pixels it wins where its own mask probability passes ``mask_threshold``,
    and is dropped when that is under ``overlap_threshold`` of its mask. Stuff queries of one
    class merge into one segment. A pixel is contested when the masks (probability >=
    ``mask_threshold``) of two or more kept queries cover it: overlapping masks, as crowded
    scenes give, are resolved there by score and counted.
    """
    cfg = cfg or PanopticInferenceConfig()
    scores, labels = class_probabilities(logits, focal).max(-1)
    keep = scores > cfg.object_mask_threshold
    scores, labels, mask_probs = scores[keep], labels[keep], mask_logits[keep].float().sigmoid()
    panoptic = torch.zeros(mask_logits.shape[-2:], dtype=torch.int64)
    segments: list[dict] = []
    if len(scores) == 0:
        return PanopticResult(panoptic, segments)
    contested = int(((mask_probs >= cfg.mask_threshold).sum(0) >= 2).sum())
    winner = (scores[:, None, None] * mask_probs).argmax(0)
    stuff_segment: dict[int, int] = {}
    for k in range(len(scores)):
        label = int(labels[k])
        own = mask_probs[k] >= cfg.mask_threshold
        visible = (winner == k) & own
        if int(own.sum()) == 0 or int(visible.sum()) == 0:
            continue
        if int(visible.sum()) / int(own.sum()) < cfg.overlap_threshold:
            continue
        thing = bool(is_thing[label])
        if not thing and label in stuff_segment:
            panoptic[visible.cpu()] = stuff_segment[label]
            continue
        segment_id = len(segments) + 1
        panoptic[visible.cpu()] = segment_id
        segments.append({"id": segment_id, "label": label, "isthing": thing, "score": float(scores[k])})
        if not thing:
            stuff_segment[label] = segment_id
    return PanopticResult(panoptic, segments, contested)
