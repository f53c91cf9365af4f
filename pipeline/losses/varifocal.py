"""Varifocal loss (Zhang et al., "VarifocalNet", CVPR 2021), the IoU-aware classification loss of
RT-DETR and DEIM: the target of a matched query's class is the IoU of its box with the target box
(not 1), so the class score ranks boxes by localisation quality."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

VARIFOCAL_ALPHA = 0.75  # weight of the negatives' focal term (VarifocalNet, RT-DETR)


def varifocal_loss(logits: Tensor, target_score: Tensor, num_boxes: Tensor | float,
                   alpha: float = VARIFOCAL_ALPHA, gamma: float = 2.0) -> Tensor:
    """(B, Q, C) logits against (B, Q, C) soft targets (IoU at the matched class, else 0).

    Positives (target > 0) are weighted by their target, negatives by ``alpha * p^gamma``
    (p detached): BCE summed, mean over queries, summed over the rest, / ``num_boxes``, as
    ``sigmoid_focal_loss`` is reduced.
    """
    prob = logits.sigmoid().detach()
    target_score = target_score.detach()
    positive = (target_score > 0).to(logits.dtype)
    weight = alpha * prob.pow(gamma) * (1 - positive) + target_score
    loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
    return loss.mean(1).sum() / num_boxes
