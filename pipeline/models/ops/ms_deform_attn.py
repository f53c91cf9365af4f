"""Multi-scale deformable attention sampling (Deformable DETR, Zhu et al. 2021), pure PyTorch.

The core op takes values of several feature levels, flattened and concatenated, and for every
query, head, level and point bilinearly samples the value map at a normalised location, then sums
the samples weighted by the attention weights.

Shapes (B batch, S = sum(h_l * w_l) value tokens, H heads, D = channels per head, Q queries,
L levels, P points per level):

    value               (B, S, H, D)
    spatial_shapes      int64 (L, 2), rows (h, w); best on the CPU: the paths read it as ints
    sampling_locations  (B, Q, H, L, P, 2), normalised (x, y) in [0, 1]; samples outside are 0
    attention_weights   (B, Q, H, L, P)
    -> output           (B, Q, H * D)

Three implementations compute the same function (``grid_sample`` with ``align_corners=False``
and zero padding, as the official code):

- ``ms_deform_attn_grid_sample``: the reference, one ``grid_sample`` call per level, as the
  official PyTorch fallback and HF transformers do;
- ``ms_deform_attn_gather``: computes the four bilinear corner indices and weights of every sample
  once for all levels and lets ``embedding_bag`` do the weighted gather-and-sum in one fused call,
  directly in the (B, Q, H * D) output layout. It never materialises the per-sample values, so it
  needs less memory, but its backward (embedding_bag's sort-based scatter) is slower than
  grid_sample's on GPU and CPU: kept as an alternative, never picked by default;
- ``ms_deform_attn_canvas``: packs all levels onto one zero canvas, framed by 1-pixel zero gutters,
  and samples them with a single ``grid_sample`` call (fewer launches, no per-level stack).

``ms_deform_attn`` dispatches between them, the fused Triton kernel of
``ms_deform_attn_triton.py`` (the CUDA default) and any kernel registered with
``register_kernel``. Half-precision inputs are computed in fp32 and cast back: bilinear weights
in bf16 lose enough precision to shift boxes, and fused kernels commonly only accept fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

KernelFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# device type ("cuda", "cpu", ...) -> kernel; filled by ``register_kernel``.
_KERNELS: dict[str, KernelFn] = {}


class MSDeformAttnInputError(ValueError):
    """Inputs of ``ms_deform_attn`` with inconsistent shapes."""


def register_kernel(device_type: str, kernel: KernelFn | None) -> None:
    """Route ``ms_deform_attn`` on ``device_type`` tensors to ``kernel`` (None restores the default).

    ``kernel`` has the signature and fp32 contract of ``ms_deform_attn`` itself.
    """
    if kernel is None:
        _KERNELS.pop(device_type, None)
    else:
        _KERNELS[device_type] = kernel


def check_inputs(value: Tensor, spatial_shapes: Tensor, locations: Tensor, weights: Tensor) -> None:
    """Raise ``MSDeformAttnInputError`` naming the mismatch instead of a deep torch error."""
    where = "pipeline/models/ops/ms_deform_attn.py"
    if value.dim() != 4 or locations.dim() != 6 or weights.dim() != 5:
        raise MSDeformAttnInputError(
            f"{where}: expected value (B,S,H,D), sampling_locations (B,Q,H,L,P,2) and "
            f"attention_weights (B,Q,H,L,P); got {tuple(value.shape)}, {tuple(locations.shape)}, "
            f"{tuple(weights.shape)}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise MSDeformAttnInputError(f"{where}: spatial_shapes must be (L, 2), got {tuple(spatial_shapes.shape)}")
    batch, tokens, heads, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    if locations.shape[-1] != 2 or locations.shape[:5] != weights.shape:
        raise MSDeformAttnInputError(
            f"{where}: sampling_locations {tuple(locations.shape)} must be attention_weights "
            f"{tuple(weights.shape)} + (2,)"
        )
    if weights.shape[0] != batch or weights.shape[2] != heads or weights.shape[3] != num_levels:
        raise MSDeformAttnInputError(
            f"{where}: attention_weights {tuple(weights.shape)} does not match batch {batch}, "
            f"heads {heads} and levels {num_levels} of value / spatial_shapes"
        )
    expected_tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if expected_tokens != tokens:
        raise MSDeformAttnInputError(
            f"{where}: value has {tokens} tokens but spatial_shapes sum to {expected_tokens}"
        )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    impl: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention sampling; see the module docstring for shapes.

    ``impl``: None picks a kernel registered for the device, else on CUDA the fused Triton kernel,
    else the faster pure PyTorch one for the sizes; ``"triton"`` (fused, CUDA fp32),
    ``"canvas"``, ``"grid_sample"`` or ``"gather"`` force one.
    """
    check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    out_dtype = value.dtype
    compute_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if impl is None:
        kernel = _default_kernel(value, sampling_locations, compute_dtype)
    elif impl == "triton":
        kernel = _triton_kernel()
        if kernel is None:
            raise ValueError("pipeline/models/ops: impl='triton' needs CUDA tensors and the triton package")
    elif impl in _IMPLS:
        kernel = _IMPLS[impl]
    else:
        raise ValueError(f"pipeline/models/ops: unknown impl {impl!r}; use one of {sorted(_IMPLS) + ['triton']}")
    out = kernel(
        value.to(compute_dtype),
        spatial_shapes,
        sampling_locations.to(compute_dtype),
        attention_weights.to(compute_dtype),
    )
    return out.to(out_dtype)


def _default_kernel(value: Tensor, sampling_locations: Tensor, compute_dtype: torch.dtype) -> KernelFn:
    """Registered kernel for the device, else on CUDA the fused Triton kernel (fp32 compute),
    else the faster pure PyTorch implementation for the sizes.

    Triton is the CUDA default by measurement (``bash benchmarks/gpu_all.sh``, H200, R50 800x1088,
    fwd+bwd, fp32 inputs; runs A and B of benchmarks/RESULTS.md): encoder sizes 2.88 ms against
    13.09 (canvas) and HF's 13.89, decoder sizes 1.07 against 1.76 (grid_sample) and 2.07; the
    whole bf16 training step 113 against 156 ms, with 5.1 instead of 9.4 GB peak.
    ``register_kernel("cuda", ms_deform_attn_pytorch)`` or ``impl=`` opts out.
    """
    if value.device.type in _KERNELS:
        return _KERNELS[value.device.type]
    if value.device.type == "cuda" and compute_dtype == torch.float32:
        fused = _triton_kernel()
        if fused is not None:
            return fused
    return _pick_pure_pytorch(value, sampling_locations)


_TRITON: list[KernelFn | None] = []  # filled on first use: [kernel] or [None] when unavailable


def _triton_kernel() -> KernelFn | None:
    """The Triton kernel, imported once on first CUDA use; None without triton or CUDA."""
    if not _TRITON:
        try:
            from pipeline.models.ops.ms_deform_attn_triton import ms_deform_attn_triton
        except ImportError:  # CPU-only installs have no triton
            _TRITON.append(None)
        else:
            _TRITON.append(ms_deform_attn_triton if torch.cuda.is_available() else None)
    return _TRITON[0]


def ms_deform_attn_pytorch(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The faster pure PyTorch path for the device and sizes (no Triton). -> (B, Q, H*D).

    ``register_kernel("cuda", ms_deform_attn_pytorch)`` keeps CUDA off the fused kernel.
    """
    kernel = _pick_pure_pytorch(value, sampling_locations)
    return kernel(value, spatial_shapes, sampling_locations, attention_weights)


def _pick_pure_pytorch(value: Tensor, sampling_locations: Tensor) -> KernelFn:
    """The faster pure PyTorch path for the device and sizes, as measured fwd+bwd
    (benchmarks/detr_step.py, interleaved rounds):

    - CUDA: the canvas (one grid_sample) for encoder self-attention (as many queries as value
      tokens), H100 at R50 800x1088 14.5 vs 15.2 ms; per-level grid_sample for decoder
      cross-attention (a few hundred queries), 2.1 vs 2.5 ms, where building the canvas costs
      more than it saves.
    - CPU: per-level grid_sample everywhere. Idle 2-core CPU, tiny config: encoder (1700
      queries and tokens) 24.2 vs 29.6 ms (canvas), HF 28.6; decoder (50 queries) 2.3 vs 3.3 ms.
      On CPU the canvas's zero-padded copy and its larger backward outweigh the saved calls.
    """
    if value.device.type == "cuda" and sampling_locations.shape[1] >= value.shape[1]:
        return ms_deform_attn_canvas
    return ms_deform_attn_grid_sample


def ms_deform_attn_grid_sample(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Reference: one ``grid_sample`` per level, as the official PyTorch fallback. -> (B, Q, H*D)."""
    batch, _, heads, channels = value.shape
    _, queries, _, num_levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(sizes, dim=1)
    # grid_sample works in [-1, 1]; align_corners=False puts pixel centres at (i + 0.5) / size.
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (B, h*w, H, D) -> (B*H, D, h, w)
        level_value = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, h, w)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B*H, D, Q, L, P) weighted by (B*H, 1, Q, L*P)
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, num_levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * channels, queries)
    return out.transpose(1, 2).contiguous()


def bilinear_corners(
    spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Flat value indices and weights of the 4 bilinear corners of every sample.

    Returns ``index`` int64 (B, Q, H, L, P, 4) into the level-concatenated token axis and
    ``weight`` (B, Q, H, L, P, 4) = attention weight x bilinear weight, 0 for corners outside the
    map (zero padding). Differentiable in locations and attention weights.
    """
    shapes = spatial_shapes.to(sampling_locations.device, non_blocking=True)
    heights, widths = shapes[:, 0], shapes[:, 1]
    level_start = torch.cat([shapes.new_zeros(1), (heights * widths).cumsum(0)[:-1]])
    # align_corners=False: location u in [0, 1] is pixel coordinate u * size - 0.5.
    size_xy = torch.stack([widths, heights], -1).to(sampling_locations.dtype)  # (L, 2)
    pixel = sampling_locations * size_xy[:, None, :] - 0.5  # (B, Q, H, L, P, 2)
    corner0 = pixel.floor()
    frac = pixel - corner0
    corner0 = corner0.long()
    x0, y0 = corner0[..., 0], corner0[..., 1]
    fx, fy = frac[..., 0], frac[..., 1]
    w_l, h_l = widths[:, None], heights[:, None]  # broadcast over P
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], -1)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], -1)
    bilinear = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    inside = (xs >= 0) & (xs < w_l[..., None]) & (ys >= 0) & (ys < h_l[..., None])
    index = level_start[:, None, None] + ys.clamp(min=0) * w_l[..., None] + xs.clamp(min=0)
    index = torch.where(inside, index, torch.zeros_like(index))
    weight = bilinear * attention_weights.unsqueeze(-1) * inside.to(bilinear.dtype)
    return index, weight


def ms_deform_attn_gather(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """All levels at once: corner indices + ``embedding_bag`` weighted sum. -> (B, Q, H*D)."""
    batch, tokens, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    index, weight = bilinear_corners(spatial_shapes, sampling_locations, attention_weights)
    # value rows are ordered (b, s, h): row of token s of head h in image b = (b*S + s)*H + h.
    batch_offset = torch.arange(batch, device=value.device).view(batch, 1, 1, 1, 1, 1) * tokens
    head_offset = torch.arange(heads, device=value.device).view(1, 1, heads, 1, 1, 1)
    rows = (batch_offset + index) * heads + head_offset
    bags = batch * queries * heads  # one bag per (b, q, h): its L*P*4 corners
    out = F.embedding_bag(
        rows.view(bags, -1),
        value.reshape(batch * tokens * heads, channels),
        per_sample_weights=weight.reshape(bags, -1),
        mode="sum",
    )
    return out.view(batch, queries, heads * channels)


def canvas_layout(spatial_shapes: Tensor) -> tuple[list[tuple[int, int]], list[int], int, int]:
    """Levels side by side on one zero canvas, each framed by a 1-pixel zero gutter.

    Returns per-level (h, w), per-level first column, canvas height and width. Level l occupies
    rows 1..h_l and columns x0_l..x0_l + w_l - 1; the gutters make a bilinear sample that leaves
    a level by less than one pixel read zeros, exactly like ``padding_mode="zeros"``.
    """
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts, column = [], 1
    for _, w in shapes:
        starts.append(column)
        column += w + 1
    return shapes, starts, max(h for h, _ in shapes) + 2, column


def ms_deform_attn_canvas(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """All levels in one ``grid_sample`` call on a packed canvas. -> (B, Q, H*D).

    Samples more than a pixel outside their level (which read zeros in the reference) get
    weight 0 instead, so they never reach a neighbouring level through the canvas.
    """
    batch, tokens, heads, channels = value.shape
    _, queries, _, num_levels, points, _ = sampling_locations.shape
    shapes, starts, canvas_h, canvas_w = canvas_layout(spatial_shapes)
    device, dtype = value.device, value.dtype
    # canvas position of every value token, for one index_copy into the flat canvas
    positions = [
        ((torch.arange(h, device=device) + 1)[:, None] * canvas_w + torch.arange(w, device=device) + x0).reshape(-1)
        for (h, w), x0 in zip(shapes, starts)
    ]
    canvas = value.new_zeros(batch * heads, channels, canvas_h * canvas_w)
    tokens_first = value.permute(0, 2, 3, 1).reshape(batch * heads, channels, tokens)
    canvas = canvas.index_copy(2, torch.cat(positions), tokens_first).view(batch * heads, channels, canvas_h, canvas_w)
    size = torch.tensor(shapes, dtype=dtype, device=device).flip(-1)  # (L, 2) as (w, h)
    origin = torch.tensor([[x0, 1] for x0 in starts], dtype=dtype, device=device)  # (L, 2) as (x, y)
    canvas_size = torch.tensor([canvas_w, canvas_h], dtype=dtype, device=device)
    pixel = sampling_locations * size[:, None, :]  # level pixel coordinate + 0.5
    inside = ((pixel > -0.5) & (pixel < size[:, None, :] + 0.5)).all(-1)
    grid = (pixel + origin[:, None, :]) / canvas_size * 2 - 1  # (B, Q, H, L, P, 2)
    weights = attention_weights * inside.to(dtype)
    grid = grid.transpose(1, 2).reshape(batch * heads, queries, num_levels * points, 2)
    samples = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, num_levels * points)
    out = (samples * weights).sum(-1).view(batch, heads * channels, queries)
    return out.transpose(1, 2).contiguous()


_IMPLS: dict[str, KernelFn] = {
    "canvas": ms_deform_attn_canvas,
    "gather": ms_deform_attn_gather,
    "grid_sample": ms_deform_attn_grid_sample,
}
