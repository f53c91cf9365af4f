"""ms_deform_attn: every implementation equals a naive per-sample bilinear loop; the dispatch
picks the fused kernel on CUDA; the transformer hands it host-side level shapes."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.ops import (
    MSDeformAttn,
    MSDeformAttnInputError,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    register_kernel,
)

IMPLS = ["grid_sample", "gather", "canvas"]
# the module, not the function of the same name that the package exports
ops = importlib.import_module("pipeline.models.ops.ms_deform_attn")
SHAPES = torch.tensor([[5, 6], [3, 4], [2, 1]])


def naive_ms_deform_attn(value, spatial_shapes, locations, weights):
    """Bilinear sampling written out point by point (align_corners=False, zero padding)."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = value.new_zeros(batch, queries, heads, channels)
    starts = [0] + torch.cumsum(spatial_shapes.prod(1), 0).tolist()[:-1]
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for lvl in range(levels):
                    height, width = spatial_shapes[lvl].tolist()
                    level = value[b, starts[lvl] : starts[lvl] + height * width, h].view(height, width, channels)
                    for p in range(points):
                        x = locations[b, q, h, lvl, p, 0] * width - 0.5
                        y = locations[b, q, h, lvl, p, 1] * height - 0.5
                        x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < width and 0 <= yi < height:
                                bilinear = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                                out[b, q, h] += weights[b, q, h, lvl, p] * bilinear * level[yi, xi]
    return out.flatten(2)


def random_inputs(dtype=torch.float64, queries=4, spread=(-0.3, 1.3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = int(SHAPES.prod(1).sum())
    batch, heads, channels, levels, points = 2, 2, 3, len(SHAPES), 2
    value = torch.randn(batch, tokens, heads, channels, generator=generator, dtype=dtype)
    low, high = spread
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype) * (high - low) + low
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return value, SHAPES, locations, weights


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_naive_loop_values_and_gradients(impl):
    value, shapes, locations, weights = random_inputs()
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    expected_leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], impl=impl)
    expected = naive_ms_deform_attn(expected_leaves[0], shapes, expected_leaves[1], expected_leaves[2])
    torch.testing.assert_close(out, expected)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * probe).sum(), expected_leaves)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    value, shapes, locations, weights = random_inputs(queries=2, spread=(0.05, 0.95))
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl=impl), inputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_samples_outside_give_zero(impl):
    value, shapes, locations, weights = random_inputs()
    far_outside = torch.where(locations > 0.5, locations + 2.0, locations - 2.0)
    out = ms_deform_attn(value, shapes, far_outside, weights, impl=impl)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_at_pixel_centre_reads_that_pixel(impl):
    value, shapes, locations, weights = random_inputs()
    locations = torch.zeros_like(locations)
    locations[..., 0] = (2 + 0.5) / 6  # level 0 pixel (row 1, col 2); other levels weight 0
    locations[..., 1] = (1 + 0.5) / 5
    weights = torch.zeros_like(weights)
    weights[:, :, :, 0, 0] = 1.0
    out = ms_deform_attn(value, shapes, locations, weights, impl=impl).view(2, -1, 2, 3)
    expected = value[:, 1 * 6 + 2]  # (B, H, D)
    torch.testing.assert_close(out, expected[:, None].expand_as(out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_half_out_computed_in_fp32(dtype):
    value, shapes, locations, weights = random_inputs(dtype=torch.float32)
    out = ms_deform_attn(value.to(dtype), shapes, locations.to(dtype), weights.to(dtype))
    assert out.dtype == dtype
    reference = ms_deform_attn(value.to(dtype).float(), shapes, locations.to(dtype).float(), weights.to(dtype).float())
    torch.testing.assert_close(out, reference.to(dtype))


def test_bad_shapes_raise_a_clear_error():
    value, shapes, locations, weights = random_inputs()
    with pytest.raises(MSDeformAttnInputError, match="tokens"):
        ms_deform_attn(value[:, :-1], shapes, locations, weights)
    with pytest.raises(MSDeformAttnInputError, match="attention_weights"):
        ms_deform_attn(value, shapes, locations, weights[..., :1])
    with pytest.raises(ValueError, match="unknown impl"):
        ms_deform_attn(value, shapes, locations, weights, impl="cuda_magic")


def test_registered_kernel_is_dispatched_and_can_be_removed():
    value, shapes, locations, weights = random_inputs(dtype=torch.float32)
    calls = []

    def kernel(*args):
        calls.append(args[0].dtype)
        return ms_deform_attn(*args, impl="grid_sample")

    register_kernel("cpu", kernel)
    try:
        ms_deform_attn(value.bfloat16(), shapes, locations, weights)
    finally:
        register_kernel("cpu", None)
    ms_deform_attn(value, shapes, locations, weights)
    assert calls == [torch.float32]


def test_module_output_shape_and_official_init():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    offsets = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    # point i of each head lies at radius (i + 1) on that head's direction
    torch.testing.assert_close(offsets[:, :, 1], 2 * offsets[:, :, 0])
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    tokens = int(SHAPES.prod(1).sum())
    query, memory = torch.randn(2, 7, 16), torch.randn(2, tokens, 16)
    for reference in (torch.rand(2, 7, 3, 2), torch.rand(2, 7, 3, 4)):
        assert attn(query, reference, memory, SHAPES).shape == (2, 7, 16)


def test_module_padding_mask_zeroes_padded_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=3, n_heads=2, n_points=2)
    tokens = int(SHAPES.prod(1).sum())
    query, memory, reference = torch.randn(1, 5, 8), torch.randn(1, tokens, 8), torch.rand(1, 5, 3, 2)
    mask = torch.zeros(1, tokens, dtype=torch.bool)
    mask[:, 10:] = True
    changed = memory.clone()
    changed[:, 10:] = torch.randn_like(changed[:, 10:]) * 100
    torch.testing.assert_close(attn(query, reference, memory, SHAPES, mask), attn(query, reference, changed, SHAPES, mask))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_matches_reference_on_gpu():
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[20, 27], [10, 14], [5, 7], [3, 4]], device="cuda")
    tokens = int(shapes.prod(1).sum())
    value = torch.randn(2, tokens, 4, 24, generator=generator).cuda()  # D = 24: not a power of two
    locations = (torch.rand(2, 50, 4, 4, 3, 2, generator=generator) * 1.4 - 0.2).cuda()
    weights = torch.rand(2, 50, 4, 4, 3, generator=generator).cuda()
    grads = {}
    for impl in ("triton", "grid_sample"):
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], impl=impl)
        probe = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
        grads[impl] = (out, *torch.autograd.grad((out * probe).sum(), leaves))
    for got, expected in zip(grads["triton"], grads["grid_sample"]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _stub(device_type: str, shape: tuple[int, ...]) -> SimpleNamespace:
    """What the dispatcher reads of a tensor: its device type and shape (no CUDA needed)."""
    return SimpleNamespace(device=SimpleNamespace(type=device_type), shape=shape)


def test_cuda_default_is_the_fused_kernel_when_triton_imports(monkeypatch):
    def fused(*args):
        raise AssertionError("only picked, never called")

    value, decoder = _stub("cuda", (2, 100, 8, 32)), _stub("cuda", (2, 50, 8, 4, 4, 2))
    monkeypatch.setattr(ops, "_TRITON", [fused])
    assert ops._default_kernel(value, decoder, torch.float32) is fused
    # float64 is computed in float64, which the kernel does not do; the CPU never gets it
    assert ops._default_kernel(value, decoder, torch.float64) is ops.ms_deform_attn_grid_sample
    assert ops._default_kernel(_stub("cpu", (2, 100, 8, 32)), decoder, torch.float32) is ops.ms_deform_attn_grid_sample
    monkeypatch.setattr(ops, "_TRITON", [None])  # no triton: the measured pure PyTorch pick
    assert ops._default_kernel(value, decoder, torch.float32) is ops.ms_deform_attn_grid_sample
    encoder = _stub("cuda", (2, 100, 8, 4, 4, 2))
    assert ops._default_kernel(value, encoder, torch.float32) is ops.ms_deform_attn_canvas


def test_a_registered_kernel_wins_and_pytorch_opts_out_of_the_fused_one(monkeypatch):
    monkeypatch.setattr(ops, "_TRITON", [lambda *args: None])
    value, decoder = _stub("cuda", (2, 100, 8, 32)), _stub("cuda", (2, 50, 8, 4, 4, 2))
    register_kernel("cuda", ms_deform_attn_pytorch)
    try:
        assert ops._default_kernel(value, decoder, torch.float32) is ms_deform_attn_pytorch
    finally:
        register_kernel("cuda", None)
    torch.manual_seed(0)
    tokens = int(SHAPES.prod(1).sum())
    inputs = (torch.randn(1, tokens, 2, 4), SHAPES, torch.rand(1, 7, 2, 3, 2, 2), torch.rand(1, 7, 2, 3, 2))
    torch.testing.assert_close(ms_deform_attn_pytorch(*inputs), ms_deform_attn(*inputs, impl="grid_sample"))


def test_the_transformer_keeps_level_shapes_on_the_host():
    """Shapes on the device made every layer's read of them a host-device synchronisation."""
    cfg = DetectorConfig(kind="deformable", num_classes=3, num_queries=5, hidden_dim=16, num_feature_levels=2,
                         enc_layers=1, dec_layers=1, nheads=2, enc_n_points=2, dec_n_points=2,
                         dim_feedforward=32, backbone=BackboneConfig(name="resnet10t", out_strides=[16, 32]))
    transformer = build_detector(cfg).transformer.to("meta")
    srcs = [torch.zeros(2, 16, 6, 8, device="meta"), torch.zeros(2, 16, 3, 4, device="meta")]
    masks = [torch.zeros(2, 6, 8, dtype=torch.bool, device="meta"), torch.zeros(2, 3, 4, dtype=torch.bool, device="meta")]
    _, _, _, shapes, _ = transformer.flatten_levels(srcs, masks, [s.clone() for s in srcs])
    assert shapes.device.type == "cpu" and shapes.tolist() == [[6, 8], [3, 4]]
