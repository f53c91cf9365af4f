"""Mask losses of matched queries: dice and per-pixel sigmoid loss, at full resolution (DETR's
segmentation head) or on sampled points (Mask2Former's importance sampling, far less memory).

Predicted masks cover the padded batch canvas; target masks are (n, h_i, w_i) at each image's
unpadded size and are zero-padded at the bottom and right to the canvas, so that both describe
the same pixels (images are padded the same way by the collate function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.focal import sigmoid_focal_loss


@dataclass
class MaskLossConfig:
    """How the mask losses of matched queries are computed."""

    num_points: int = 12544  # points sampled per mask (112 * 112); 0 = every pixel of the target
    oversample_ratio: float = 3.0  # candidates drawn per kept point when choosing uncertain points
    importance_sample_ratio: float = 0.75  # share of points taken where the prediction is uncertain
    focal: bool = False  # per-pixel sigmoid focal loss (DETR segm); False = binary cross-entropy
    focal_alpha: float = 0.25  # focal alpha (focal only)
    focal_gamma: float = 2.0  # focal gamma (focal only)

    def __post_init__(self) -> None:
        if self.num_points < 0:
            raise ValueError(f"MaskLossConfig.num_points must be >= 0 (0 = full resolution), got {self.num_points}")
        if self.oversample_ratio < 1.0:
            raise ValueError(f"MaskLossConfig.oversample_ratio must be >= 1, got {self.oversample_ratio}")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            raise ValueError("MaskLossConfig.importance_sample_ratio must lie in [0, 1], got "
                             f"{self.importance_sample_ratio}")


def dice_loss(logits: Tensor, targets: Tensor, num_masks: Tensor | float) -> Tensor:
    """1 - soft dice of (M, P) logits against (M, P) {0, 1} targets, summed / num_masks."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, num_masks: Tensor | float) -> Tensor:
    """Binary cross-entropy of (M, P) logits, mean over points, summed / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def point_sample(features: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of (M, C, H, W) maps at (M, P, 2) x, y points in [0, 1] -> (M, C, P)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # (M, P, 1, 2) in grid_sample's [-1, 1]
    # "border": a point in the outer half pixel takes the edge value; zero padding would pull
    # logits there towards 0 (probability 0.5) and bias the loss on coarse masks.
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border",
                         align_corners=False).squeeze(3)


@torch.no_grad()
def uncertain_point_coords(logits: Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_sample_ratio: float = 0.75) -> Tensor:
    """(M, 1, H, W) mask logits -> (M, num_points, 2) points, most where the logit is near 0.

    ``importance_sample_ratio`` of the points are the most uncertain of ``oversample_ratio *
    num_points`` random candidates; the rest are uniform, so that easy regions still count.
    """
    num_masks = logits.shape[0]
    candidates = torch.rand(num_masks, int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # (M, candidates)
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    uniform = torch.rand(num_masks, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([chosen, uniform], dim=1)


def pad_masks(masks: list[Tensor], canvas: tuple[int, int]) -> list[Tensor]:
    """Zero-pad each (n_i, h_i, w_i) mask stack at the bottom and right to (n_i, H, W)."""
    height, width = canvas
    padded = []
    for i, stack in enumerate(masks):
        if stack.shape[-2] > height or stack.shape[-1] > width:
            raise ValueError(f"target masks {i} of size {tuple(stack.shape[-2:])} exceed the canvas "
                             f"{canvas}; pass the padded image size as canvas_size")
        padded.append(F.pad(stack.float(), (0, width - stack.shape[-1], 0, height - stack.shape[-2])))
    return padded


def mask_losses(pred_masks: Tensor, target_masks: Tensor, num_masks: Tensor | float,
                cfg: MaskLossConfig) -> dict[str, Tensor]:
    """{"loss_mask", "loss_dice"} of matched (M, h, w) mask logits against (M, H, W) targets.

    Both cover the same canvas; predictions are usually coarser. fp32. With M = 0 both are 0 and
    still attached to the graph.
    """
    pred = pred_masks.float()[:, None]  # (M, 1, h, w)
    if len(pred) == 0:  # sampling and interpolation reject empty batches
        zero = pred.sum() * 0.0
        return {"loss_mask": zero, "loss_dice": zero.clone()}
    target = target_masks.to(pred)[:, None]  # (M, 1, H, W)
    if cfg.num_points > 0:
        coords = uncertain_point_coords(pred, cfg.num_points, cfg.oversample_ratio,
                                        cfg.importance_sample_ratio)
        pred_points, target_points = point_sample(pred, coords)[:, 0], point_sample(target, coords)[:, 0]
    else:
        pred_points = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False).flatten(1)
        target_points = target.flatten(1)
    if cfg.focal:
        per_pixel = sigmoid_focal_loss(pred_points, target_points, num_masks, cfg.focal_alpha, cfg.focal_gamma)
    else:
        per_pixel = sigmoid_bce_loss(pred_points, target_points, num_masks)
    return {"loss_mask": per_pixel, "loss_dice": dice_loss(pred_points, target_points, num_masks)}
