"""A tiny segmenter overfits two synthetic images: panoptic quality >= 0.8 (80 %) on them.

The whole panoptic path runs for real: timm backbone, deformable transformer, pixel decoder and
mask embeddings, Hungarian matching, box and point-sampled mask losses, panoptic inference and
the PQ evaluator against ground-truth panoptic maps with things and stuff.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from pipeline.boxes import box_xyxy_to_cxcywh, masks_to_boxes
from pipeline.eval.panoptic import PanopticEvaluator
from pipeline.eval.segmentation_inference import (
    PanopticInferenceConfig,
    panoptic_inference,
    resize_mask_logits,
)
from pipeline.losses import HungarianMatcher, LossWeights, MaskLossConfig, SetCriterion
from pipeline.models import BackboneConfig, DetectorConfig
from pipeline.models.mask_head import MaskHeadConfig, SegmenterConfig, build_segmenter

SIDE = 64
# things: (label, x0, y0, x1, y1); labels 0, 1 are things, 2 (top) and 3 (bottom) stuff
OBJECTS = [
    [(0, 6, 8, 30, 28), (1, 36, 34, 60, 60)],
    [(1, 10, 36, 26, 58), (0, 30, 4, 58, 22)],
]
COLOURS = {0: (1.0, -0.5, -0.5), 1: (-0.5, -0.5, 1.0), 2: (-0.3, 0.6, 0.6), 3: (0.4, 0.2, -0.6)}
CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 3, "isthing": 0}, {"id": 4, "isthing": 0}]
STEPS = int(os.environ.get("DETRFORGE_OVERFIT_STEPS", "100"))  # measured: PQ 0.99 after 50 steps


def synthetic_scenes():
    """Two images (stuff halves + coloured rectangles), their targets with masks, and their
    ground-truth panoptic maps + segments_info."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, SIDE, SIDE, generator=generator) * 0.2
    targets, panoptic = [], []
    for index, objects in enumerate(OBJECTS):
        ids = torch.zeros(SIDE, SIDE, dtype=torch.int64)
        ids[: SIDE // 2], ids[SIDE // 2 :] = 1, 2  # stuff segments 1 (label 2) and 2 (label 3)
        segments = [(1, 2), (2, 3)]
        for number, (label, x0, y0, x1, y1) in enumerate(objects, start=3):
            ids[y0:y1, x0:x1] = number
            segments.append((number, label))
        masks = torch.stack([ids == number for number, _ in segments])
        for mask, (_, label) in zip(masks, segments):
            images[index] += torch.tensor(COLOURS[label])[:, None, None] * mask
        labels = torch.tensor([label for _, label in segments])
        boxes = box_xyxy_to_cxcywh(masks_to_boxes(masks)) / SIDE
        targets.append({"labels": labels, "boxes": boxes, "masks": masks})
        panoptic.append((ids, [{"id": n, "category_id": label + 1} for n, label in segments]))
    return images, torch.zeros(2, SIDE, SIDE, dtype=torch.bool), targets, panoptic


def tiny_segmenter(mask_attention: str = "none") -> torch.nn.Module:
    detector = DetectorConfig(
        kind="deformable", num_classes=4, num_queries=12, hidden_dim=64, num_feature_levels=3,
        enc_layers=1, dec_layers=2, nheads=4, enc_n_points=2, dec_n_points=2, dim_feedforward=128,
        dropout=0.0, box_refine=True,
        backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True),
    )
    return build_segmenter(SegmenterConfig(detector, MaskHeadConfig(mask_dim=64, pixel_stride=4),
                                           mask_attention=mask_attention))


def panoptic_quality(model, images, padding_mask, panoptic) -> float:
    model.eval()
    with torch.no_grad():
        outputs = model(images, padding_mask)
    evaluator = PanopticEvaluator(CATEGORIES)
    cfg = PanopticInferenceConfig(object_mask_threshold=0.4)
    for i, (gt_ids, gt_segments) in enumerate(panoptic):
        masks = resize_mask_logits(outputs["pred_masks"][i], (SIDE, SIDE), (SIDE, SIDE), (SIDE, SIDE))
        ids, segments = panoptic_inference(outputs["pred_logits"][i], masks, True, [True, True, False, False], cfg)
        evaluator.update(gt_ids, gt_segments, ids, [{"id": s["id"], "category_id": s["label"] + 1} for s in segments])
    return evaluator.summarize()["PQ"] / 100


@pytest.mark.slow
@pytest.mark.parametrize("mask_attention", ["none", "masked"])
def test_tiny_segmenter_overfits_two_images_to_pq_above_0_8(mask_attention):
    torch.manual_seed(0)
    images, padding_mask, targets, panoptic = synthetic_scenes()
    model = tiny_segmenter(mask_attention).train()
    criterion = SetCriterion(num_classes=4, matcher=HungarianMatcher(focal=True), focal=True,
                             mask_loss=MaskLossConfig(num_points=256))
    weights = LossWeights(ce=2.0, bbox=5.0, giou=2.0, mask=5.0, dice=5.0)
    groups = {"backbone": [], "linear_proj": [], "default": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[model.param_group(name)].append(param)
    optimizer = torch.optim.AdamW(
        [{"params": groups["backbone"], "lr": 2e-4}, {"params": groups["linear_proj"], "lr": 1e-4},
         {"params": groups["default"], "lr": 1e-3}], weight_decay=1e-4,
    )
    pq_before = panoptic_quality(model, images, padding_mask, panoptic)
    model.train()
    start = time.perf_counter()
    for _ in range(STEPS):
        total, _ = criterion.loss_and_metrics(model(images, padding_mask), targets, weights, (SIDE, SIDE))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    elapsed = time.perf_counter() - start
    pq_after = panoptic_quality(model, images, padding_mask, panoptic)
    print(f"PQ {pq_before:.3f} -> {pq_after:.3f} in {STEPS} steps, {elapsed:.1f} s")
    assert pq_before < 0.3
    assert pq_after >= 0.8
