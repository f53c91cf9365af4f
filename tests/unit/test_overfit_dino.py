"""A tiny DINO overfits two synthetic images: COCO AP >= 0.9 on them, as the Deformable-DETR test
(test_overfit_detr.py, whose images and evaluation it shares). The training forward gets the
targets (contrastive denoising queries) and the criterion adds the denoising losses."""

from __future__ import annotations

import os
import time

import pytest
import torch

from pipeline.losses import CriterionConfig, LossWeights
from pipeline.losses.denoising import build_dino_criterion
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.denoising import DenoisingConfig
from tests.unit.test_overfit_detr import coco_ap, synthetic_batch

STEPS = int(os.environ.get("DETRFORGE_OVERFIT_STEPS", "200"))


def tiny_dino() -> torch.nn.Module:
    cfg = DetectorConfig(
        kind="dino", num_classes=2, num_queries=12, hidden_dim=64, num_feature_levels=3,
        enc_layers=1, dec_layers=2, nheads=4, enc_n_points=2, dec_n_points=2, dim_feedforward=128,
        dropout=0.0, two_stage=True, box_refine=True, denoising=DenoisingConfig(dn_number=12),
        backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True),
    )
    return build_detector(cfg)


@pytest.mark.slow
def test_tiny_dino_overfits_two_images():
    torch.manual_seed(0)
    images, mask, targets, coco = synthetic_batch()
    model = tiny_dino().train()
    criterion = build_dino_criterion(CriterionConfig(), num_classes=2, focal=True)
    groups: dict[str, list] = {"backbone": [], "linear_proj": [], "default": []}
    for name, param in model.named_parameters():
        groups[model.param_group(name)].append(param)
    optimizer = torch.optim.AdamW(
        [{"params": groups["backbone"], "lr": 2e-4}, {"params": groups["linear_proj"], "lr": 1e-4},
         {"params": groups["default"], "lr": 1e-3}],
        weight_decay=1e-4,
    )
    ap_before = coco_ap(model, images, mask, targets, coco)
    model.train()
    start = time.perf_counter()
    for _ in range(STEPS):
        outputs = model(images, mask, targets)
        total, _ = criterion.loss_and_metrics(outputs, targets, LossWeights.deformable_detr())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    elapsed = time.perf_counter() - start
    ap_after = coco_ap(model, images, mask, targets, coco)
    print(f"AP {ap_before:.3f} -> {ap_after:.3f} in {STEPS} steps, {elapsed:.1f} s")
    assert ap_before < 0.5
    assert ap_after >= 0.9
