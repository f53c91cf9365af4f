"""Custom ops of the detectors: multi-scale deformable attention.

The fused Triton kernel lives in ``ms_deform_attn_triton`` (imported on first CUDA use: it needs
triton); ``ms_deform_attn`` picks it for CUDA tensors, the pure PyTorch paths elsewhere.
"""

from pipeline.models.ops.ms_deform_attn import (
    MSDeformAttnInputError,
    ms_deform_attn,
    ms_deform_attn_canvas,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
    ms_deform_attn_pytorch,
    register_kernel,
)
from pipeline.models.ops.ms_deform_attn_module import MSDeformAttn

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnInputError",
    "ms_deform_attn",
    "ms_deform_attn_canvas",
    "ms_deform_attn_gather",
    "ms_deform_attn_grid_sample",
    "ms_deform_attn_pytorch",
    "register_kernel",
]
