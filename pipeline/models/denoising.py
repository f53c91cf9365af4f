"""Contrastive denoising (CDN) queries of DINO (Zhang et al., ICLR 2023, Sec. 3.3) and the decoder's
self-attention mask that keeps them apart from the matching queries.

In training, each image's ground truth is copied into ``groups`` denoising groups. A group holds
``2 * M`` slots (M = the most boxes of any image in the batch): M positives (box noise below
``box_noise_scale`` times half the box side, trained to reconstruct the box) then M negatives
(noise between 1x and 2x that, trained as "no object"). Slots of images with fewer boxes are
padding: label ``num_classes`` (an extra "no label" embedding row), trained as "no object".

Layout of the P = groups * 2M denoising slots: slot ``g * 2M + j`` is the positive and
``g * 2M + M + j`` the negative copy of target ``j`` in group ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh


@dataclass
class DenoisingConfig:
    """DINO's contrastive denoising (training only; inference never sees it)."""

    dn_number: int = 100  # denoising queries per image (positives + negatives of all groups); 0 = off
    label_noise_ratio: float = 0.5  # a label is replaced by a random class with probability ratio / 2
    box_noise_scale: float = 1.0  # positives move each side by < scale * half its length

    def __post_init__(self) -> None:
        if self.dn_number < 0:
            raise ValueError(f"model.denoising.dn_number must be >= 0 (0 = off), got {self.dn_number}")
        if not 0.0 <= self.label_noise_ratio <= 1.0:
            raise ValueError(f"model.denoising.label_noise_ratio must lie in [0, 1], got {self.label_noise_ratio}")
        if self.box_noise_scale < 0:
            raise ValueError(f"model.denoising.box_noise_scale must be >= 0, got {self.box_noise_scale}")


@dataclass
class DenoisingQueries:
    """One batch's denoising queries (P = groups * 2 * max_boxes slots per image)."""

    labels: Tensor  # (B, P) int64 noised labels; num_classes on padding slots
    boxes: Tensor  # (B, P, 4) noised cx, cy, w, h in [0, 1]
    groups: int  # denoising groups
    max_boxes: int  # M: positives (and negatives) per group

    @property
    def num_slots(self) -> int:
        return self.groups * 2 * self.max_boxes


def num_groups(dn_number: int, max_boxes: int) -> int:
    """DINO's rule: as many groups of 2 * max_boxes slots as fit in dn_number, at least one."""
    return max(1, dn_number // (2 * max_boxes))


def make_denoising_queries(targets: list[dict], cfg: DenoisingConfig, num_classes: int,
                           generator: torch.Generator | None = None) -> DenoisingQueries | None:
    """Noised copies of the targets ({"labels" (n,), "boxes" (n, 4) cx, cy, w, h}); None when
    denoising is off or no image of the batch has a box."""
    max_boxes = max((len(t["labels"]) for t in targets), default=0)
    if cfg.dn_number == 0 or max_boxes == 0:
        return None
    groups = num_groups(cfg.dn_number, max_boxes)
    device = targets[0]["boxes"].device
    batch, slots = len(targets), groups * 2 * max_boxes
    labels = torch.full((batch, slots), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros(batch, slots, 4, device=device)
    for image, target in enumerate(targets):
        count = len(target["labels"])
        if count == 0:
            continue
        gt_labels = target["labels"].to(device, torch.int64).repeat(2 * groups)  # (2 * groups * n,)
        gt_boxes = target["boxes"].to(device, torch.float32).repeat(2 * groups, 1)
        negative = torch.arange(2 * groups, device=device).repeat_interleave(count) % 2 == 1
        noised_labels = noise_labels(gt_labels, cfg.label_noise_ratio, num_classes, generator)
        noised_boxes = noise_boxes(gt_boxes, negative, cfg.box_noise_scale, generator)
        # copy c = 2g + s (s = 0 positive, 1 negative) of target j goes to slot g * 2M + s * M + j
        copy = torch.arange(2 * groups, device=device).repeat_interleave(count)
        slot = (copy // 2) * 2 * max_boxes + (copy % 2) * max_boxes + torch.arange(count, device=device).repeat(2 * groups)
        labels[image, slot] = noised_labels
        boxes[image, slot] = noised_boxes
    return DenoisingQueries(labels, boxes, groups, max_boxes)


def noise_labels(labels: Tensor, ratio: float, num_classes: int, generator: torch.Generator | None) -> Tensor:
    """Replace each label by a uniformly drawn class with probability ratio / 2 (DINO's rule)."""
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < ratio * 0.5
    random = torch.randint(0, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, random, labels)


def noise_boxes(boxes: Tensor, negative: Tensor, scale: float, generator: torch.Generator | None) -> Tensor:
    """(N, 4) cx, cy, w, h boxes, (N,) bool negative -> noised boxes clamped to the image.

    Each corner moves by ``sign * part * scale * half side``, part in [0, 1) for positives and
    [1, 2) for negatives: negatives lie farther from the box than every positive.
    """
    xyxy = box_cxcywh_to_xyxy(boxes)
    half = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:] / 2], -1)
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device) * 2.0 - 1.0
    part = torch.rand(boxes.shape, generator=generator, device=boxes.device) + negative[:, None].float()
    xyxy = (xyxy + sign * part * half * scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(xyxy)


def self_attention_mask(num_dn: int, dn_group_size: int, num_queries: int, query_groups: int,
                        device: torch.device | None = None) -> Tensor | None:
    """(T, T) bool, True where query row may not attend to column; T = num_dn + Q * query_groups.

    Denoising slots come first. Matching queries never see denoising ones (they would learn from
    the ground truth); a denoising group sees itself and the matching queries only; a Group-DETR
    matching group sees itself only. None when nothing is masked.
    """
    if num_dn == 0 and query_groups == 1:
        return None
    total = num_dn + num_queries * query_groups
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    for start in range(0, num_dn, dn_group_size):
        mask[start : start + dn_group_size, :num_dn] = True
        mask[start : start + dn_group_size, start : start + dn_group_size] = False
    for group in range(query_groups):
        rows = slice(num_dn + group * num_queries, num_dn + (group + 1) * num_queries)
        mask[rows, num_dn:] = True
        mask[rows, rows] = False
    return mask
