"""Sigmoid focal loss (Lin et al. 2017), reduced as DETR-family reference code does."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: Tensor | float,
                       alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss of (N, P, ...) logits against same-shape {0, 1} (or soft) targets.

    Mean over dim 1 (queries of a (B, Q, C) class head, points of an (M, P) mask), summed over
    the rest, divided by ``num_boxes``. A negative ``alpha`` disables the class balancing.
    """
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes
