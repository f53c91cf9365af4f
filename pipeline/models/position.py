"""Sine position embedding of DETR, aware of the padding mask.

Coordinates count only unpadded pixels (cumulative sum over ``~mask``) and, with ``normalize``,
are divided by the unpadded size, so an image gets the same embedding whatever padding its batch
adds. Deformable DETR shifts coordinates by -0.5 (pixel centres): ``offset=-0.5``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """mask (B, H, W) bool, True on padding -> (B, 2 * num_pos_feats, H, W), y features first."""

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ):
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin (even channels) and cos (odd channels), as the original
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def mask_to_feature(padding_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Padding mask (B, H, W) -> (B, h, w) at a feature map's size (nearest, as DETR)."""
    resized = nn.functional.interpolate(padding_mask[:, None].to(torch.float32), size=size)
    return resized[:, 0].to(torch.bool)
