"""``MSDeformAttn``: the multi-scale deformable attention layer around the core sampling op."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pipeline.models.ops.ms_deform_attn import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Value / offset / attention-weight projections around ``ms_deform_attn``.

    Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``)
    and initialisation follow the official Deformable DETR so its weights load one to one.

    ``trace``: None (the default: nothing is kept), or a list to which every forward appends
    {"sampling_locations", "attention_weights"}: the very tensors handed to ``ms_deform_attn``,
    detached (``pipeline.models.trace.record_decoder`` sets it on the decoder's layers).
    """

    trace: list[dict[str, Tensor]] | None = None

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"pipeline/models/ops: d_model ({d_model}) must be divisible by n_heads ({n_heads})"
            )
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring per head (point i at radius i+1), uniform attention weights."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.constant_(proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        input_padding_mask: Tensor | None = None,
        weight_filter: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Attend from queries to the flattened multi-scale map.

        query (B, Q, C); reference_points (B, Q, L, 2) normalised (x, y), or (B, Q, L, 4) boxes
        (cx, cy, w, h) whose size scales the offsets; input_flatten (B, S, C); spatial_shapes
        int64 (L, 2); input_padding_mask bool (B, S) True on padding -> (B, Q, C).
        ``weight_filter(weights (B, Q, H, L, P), locations (B, Q, H, L, P, 2)) -> weights``
        rewrites the attention weights before sampling (masked attention of a segmenter).
        """
        batch, queries, _ = query.shape
        tokens = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, self.n_heads, self.d_model // self.n_heads)
        shape = (batch, queries, self.n_heads, self.n_levels, self.n_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(batch, queries, self.n_heads, -1)
        weights = weights.softmax(-1).view(shape)
        locations = sampling_locations(reference_points, offsets, spatial_shapes, self.n_points)
        if weight_filter is not None:
            weights = weight_filter(weights, locations)
        if self.trace is not None:
            self.trace.append({"sampling_locations": locations.detach(),
                               "attention_weights": weights.detach()})
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))


def sampling_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor, n_points: int) -> Tensor:
    """Reference points (B, Q, L, 2|4) + offsets (B, Q, H, L, P, 2) -> (B, Q, H, L, P, 2).

    Point references: offsets are in pixels of each level. Box references: offsets are relative
    to half the box size, divided by the number of points (as the official code).
    """
    if reference_points.shape[-1] == 2:
        # (w, h) per level so that one offset unit is one pixel of that level
        normalizer = spatial_shapes.flip(-1).to(offsets.device, offsets.dtype, non_blocking=True)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        centre = reference_points[:, :, None, :, None, :2]
        size = reference_points[:, :, None, :, None, 2:]
        return centre + offsets / n_points * size * 0.5
    raise ValueError(
        "pipeline/models/ops: reference_points last dimension must be 2 (points) or 4 (boxes), "
        f"got {reference_points.shape[-1]}"
    )
