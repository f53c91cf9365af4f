"""Fused CUDA kernels for ``ms_deform_attn``, written in Triton (forward and backward).

One program handles a block of queries of one (image, head): it walks the L x P samples of each
query, gathers the four bilinear corners as contiguous D-channel rows of ``value`` (B, S, H, D)
and accumulates in registers, so no (B*H, D, Q, L*P) intermediate is ever written. The backward
recomputes the corners, scatters value gradients with atomic adds of whole D rows (coalesced,
unlike grid_sample's per-channel atomics) and reduces the location and weight gradients in
registers. fp32 only; ``ms_deform_attn`` casts half precision to fp32 before calling it.

``ms_deform_attn`` picks it for CUDA tensors whenever triton imports. Values and gradients (value,
locations, weights) were checked against the grid_sample reference with Triton's interpreter
(``TRITON_INTERPRET=1``) on CPU and compiled on an H200 (the gpu-marked test in
``tests/unit/test_ms_deform_attn.py``); ``benchmarks/detr_step.py`` times it ("ours_triton").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_Q = 32


@triton.jit
def _corner(value_ptr, row, valid, base, h, H: tl.constexpr, D: tl.constexpr, d, dmask):
    """(BQ, BD) rows of value at token ``row`` (BQ,), zeros where not ``valid``, and their offsets."""
    offsets = ((base + row[:, None]) * H + h) * D + d[None, :]
    return tl.load(value_ptr + offsets, mask=valid[:, None] & dmask[None, :], other=0.0), offsets


@triton.jit
def _forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, S, Q,
    H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Q
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    base = b * S
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for lvl in tl.static_range(L):
        height = tl.load(shapes_ptr + 2 * lvl)
        width = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for p in tl.static_range(P):
            sample = (((b * Q + q) * H + h) * L + lvl) * P + p
            x = tl.load(loc_ptr + 2 * sample, mask=qmask, other=0.0) * width - 0.5
            y = tl.load(loc_ptr + 2 * sample + 1, mask=qmask, other=0.0) * height - 0.5
            a = tl.load(attn_ptr + sample, mask=qmask, other=0.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            for corner in tl.static_range(4):
                xi = x0 + (corner % 2)
                yi = y0 + (corner // 2)
                wx = fx if corner % 2 == 1 else 1.0 - fx
                wy = fy if corner // 2 == 1 else 1.0 - fy
                valid = qmask & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                row = start + yi * width + xi
                v, _ = _corner(value_ptr, row, valid, base, h, H, D, d, dmask)
                acc += (a * wx * wy)[:, None] * v
    out = out_ptr + ((b * Q + q[:, None]) * H + h) * D + d[None, :]
    tl.store(out, acc, mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr, S, Q,
    H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Q
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    base = b * S
    grad_out = tl.load(
        grad_out_ptr + ((b * Q + q[:, None]) * H + h) * D + d[None, :],
        mask=qmask[:, None] & dmask[None, :], other=0.0,
    )
    for lvl in tl.static_range(L):
        height = tl.load(shapes_ptr + 2 * lvl)
        width = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for p in tl.static_range(P):
            sample = (((b * Q + q) * H + h) * L + lvl) * P + p
            x = tl.load(loc_ptr + 2 * sample, mask=qmask, other=0.0) * width - 0.5
            y = tl.load(loc_ptr + 2 * sample + 1, mask=qmask, other=0.0) * height - 0.5
            a = tl.load(attn_ptr + sample, mask=qmask, other=0.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            grad_a = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            grad_x = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            grad_y = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            for corner in tl.static_range(4):
                xi = x0 + (corner % 2)
                yi = y0 + (corner // 2)
                wx = fx if corner % 2 == 1 else 1.0 - fx
                wy = fy if corner // 2 == 1 else 1.0 - fy
                sign_x = 1.0 if corner % 2 == 1 else -1.0
                sign_y = 1.0 if corner // 2 == 1 else -1.0
                valid = qmask & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                row = start + yi * width + xi
                v, offsets = _corner(value_ptr, row, valid, base, h, H, D, d, dmask)
                dot = tl.sum(v * grad_out, axis=1)
                grad_a += wx * wy * dot
                grad_x += sign_x * wy * dot
                grad_y += wx * sign_y * dot
                tl.atomic_add(
                    grad_value_ptr + offsets, (a * wx * wy)[:, None] * grad_out, mask=valid[:, None] & dmask[None, :]
                )
            tl.store(grad_attn_ptr + sample, grad_a, mask=qmask)
            tl.store(grad_loc_ptr + 2 * sample, a * grad_x * width, mask=qmask)
            tl.store(grad_loc_ptr + 2 * sample + 1, a * grad_y * height, mask=qmask)


def _launch_args(value: Tensor, spatial_shapes: Tensor, locations: Tensor):
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    # computed where the shapes live (the host, from the transformer) and copied without a sync
    shapes = spatial_shapes.to(torch.int32)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1].to(torch.int32)])
    shapes = shapes.to(value.device, non_blocking=True).contiguous()
    starts = starts.to(value.device, non_blocking=True)
    grid = (triton.cdiv(queries, BLOCK_Q), batch * heads)
    meta = dict(H=heads, D=channels, L=levels, P=points, BLOCK_Q=BLOCK_Q, BLOCK_D=triton.next_power_of_2(channels))
    return shapes, starts, grid, meta, tokens, queries


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, locations, weights):
        value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
        shapes, starts, grid, meta, tokens, queries = _launch_args(value, spatial_shapes, locations)
        batch, _, heads, channels = value.shape
        out = value.new_empty(batch, queries, heads * channels)
        _forward_kernel[grid](value, shapes, starts, locations, weights, out, tokens, queries, **meta)
        ctx.save_for_backward(value, spatial_shapes, locations, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        value, spatial_shapes, locations, weights = ctx.saved_tensors
        shapes, starts, grid, meta, tokens, queries = _launch_args(value, spatial_shapes, locations)
        grad_value = torch.zeros_like(value)
        grad_loc = torch.empty_like(locations)
        grad_attn = torch.empty_like(weights)
        _backward_kernel[grid](
            value, shapes, starts, locations, weights, grad_out.contiguous(),
            grad_value, grad_loc, grad_attn, tokens, queries, **meta,
        )
        return grad_value, None, grad_loc, grad_attn


def ms_deform_attn_triton(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Fused kernel, same contract as ``ms_deform_attn`` (fp32 CUDA tensors). -> (B, Q, H*D)."""
    if value.dtype != torch.float32:
        raise ValueError(
            f"pipeline/models/ops/ms_deform_attn_triton.py: the fused kernel computes in fp32, got "
            f"{value.dtype}; call ms_deform_attn (which casts) or use impl='grid_sample' for float64"
        )
    return _MSDeformAttnTriton.apply(value, spatial_shapes, sampling_locations, attention_weights)
