"""The detectors and the segmenter on CUDA, where ``ms_deform_attn`` runs the fused Triton kernel
by default and the level shapes stay on the host: the same outputs as on the CPU, a training step
with the DINO criterion, and no host-device synchronisation inside a detector's forward.
Skipped without CUDA (run by ``bash benchmarks/gpu_all.sh``)."""

from __future__ import annotations

import pytest
import torch

from pipeline.losses import CriterionConfig, LossWeights, SetCriterion
from pipeline.losses.denoising import build_dino_criterion
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.denoising import DenoisingConfig
from pipeline.models.mask_head import MaskHeadConfig, SegmenterConfig, build_segmenter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HEIGHT, WIDTH = 96, 128


def detector_cfg(kind: str) -> DetectorConfig:
    dino = kind == "dino"
    return DetectorConfig(
        kind=kind, num_classes=5, num_queries=12, hidden_dim=32, num_feature_levels=4, enc_layers=2,
        dec_layers=2, nheads=4, enc_n_points=2, dec_n_points=2, dim_feedforward=64, dropout=0.0,
        two_stage=dino, box_refine=dino, denoising=DenoisingConfig(dn_number=8) if dino else None,
        backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True))


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "segmenter":
        return build_segmenter(SegmenterConfig(detector_cfg("dino"), MaskHeadConfig(mask_dim=16),
                                               mask_attention="masked+boxes"))
    return build_detector(detector_cfg(name))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    padding = torch.zeros(2, HEIGHT, WIDTH, dtype=torch.bool)
    padding[1, :, 96:] = True  # a padded image: the valid ratios and masks take part
    return torch.randn(2, 3, HEIGHT, WIDTH, generator=generator), padding


@pytest.fixture
def exact_fp32():
    """No TF32 in convolutions and matmuls, so CPU and CUDA agree to fp32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("name", ["deformable", "dino", "segmenter"])
def test_cuda_outputs_match_cpu(name, exact_fp32):
    model = build(name).eval()
    images, padding = batch()
    with torch.no_grad():
        expected = model(images, padding)
        got = model.cuda()(images.cuda(), padding.cuda())
    keys = [k for k in ("pred_logits", "pred_boxes", "pred_masks") if k in expected]
    assert "pred_logits" in keys and "pred_boxes" in keys
    for key in keys:
        torch.testing.assert_close(got[key].cpu(), expected[key], rtol=1e-3, atol=1e-3, msg=key)


@pytest.mark.parametrize("name", ["deformable", "dino"])
def test_detector_forward_never_synchronises(name):
    """A synchronisation inside the forward stalls the CPU that launches the kernels; the step
    is launch-bound at R50 sizes, so each one costs time (benchmarks/RESULTS.md)."""
    model = build(name).eval().cuda()
    images, padding = (t.cuda() for t in batch())
    with torch.no_grad():
        model(images, padding)  # warm-up: Triton compiles, cuDNN picks its kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(images, padding)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_dino_training_step_on_cuda_gives_finite_gradients_to_every_parameter():
    model = build("dino").train().cuda()
    images, padding = (t.cuda() for t in batch())
    targets = [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3]])}]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    criterion = build_dino_criterion(CriterionConfig(), num_classes=5, focal=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = criterion(model(images, padding, targets), targets)
    total = SetCriterion.weighted_total(losses, LossWeights())
    total.backward()
    assert torch.isfinite(total)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
