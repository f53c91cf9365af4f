"""A tiny Deformable DETR overfits two synthetic images: COCO AP >= 0.9 on them.

The whole detection path runs for real: timm backbone, deformable transformer, Hungarian
matcher and set criterion, post-processing and pycocotools evaluation.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from pipeline.eval.coco import CocoEvaluator
from pipeline.eval.postprocess import postprocess_detections
from pipeline.losses import HungarianMatcher, LossWeights, SetCriterion
from pipeline.models import BackboneConfig, DetectorConfig, build_detector

SIDE = 64
# (label, x0, y0, x1, y1) in pixels; two classes, objects of several sizes
OBJECTS = [
    [(0, 6, 8, 30, 28), (1, 36, 30, 60, 60)],
    [(1, 10, 36, 26, 58), (0, 30, 4, 58, 22), (1, 44, 40, 56, 52)],
]
COLOURS = {0: (1.0, -0.5, -0.5), 1: (-0.5, -0.5, 1.0)}
STEPS = int(os.environ.get("DETRFORGE_OVERFIT_STEPS", "200"))


def synthetic_batch() -> tuple[torch.Tensor, torch.Tensor, list[dict], dict]:
    """Two images with coloured rectangles (class = colour) on textured noise, as a detection
    batch plus the matching COCO ground-truth dict."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, SIDE, SIDE, generator=generator) * 0.3
    targets, annotations = [], []
    for index, objects in enumerate(OBJECTS):
        boxes, labels = [], []
        for label, x0, y0, x1, y1 in objects:
            images[index, :, y0:y1, x0:x1] = torch.tensor(COLOURS[label])[:, None, None]
            boxes.append([(x0 + x1) / 2 / SIDE, (y0 + y1) / 2 / SIDE, (x1 - x0) / SIDE, (y1 - y0) / SIDE])
            labels.append(label)
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": label + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        targets.append({"labels": torch.tensor(labels), "boxes": torch.tensor(boxes), "image_id": index,
                        "orig_size": torch.tensor([SIDE, SIDE]), "size": torch.tensor([SIDE, SIDE])})
    coco = {"images": [{"id": i, "height": SIDE, "width": SIDE} for i in range(2)], "annotations": annotations,
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}
    mask = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    return images, mask, targets, coco


def tiny_deformable_detr() -> torch.nn.Module:
    cfg = DetectorConfig(
        kind="deformable", num_classes=2, num_queries=12, hidden_dim=64, num_feature_levels=3,
        enc_layers=1, dec_layers=2, nheads=4, enc_n_points=2, dec_n_points=2, dim_feedforward=128,
        dropout=0.0, box_refine=True,
        backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True),
    )
    return build_detector(cfg)


def coco_ap(model: torch.nn.Module, images, mask, targets, coco) -> float:
    model.eval()
    with torch.no_grad():
        detections = postprocess_detections(model(images, mask), torch.stack([t["orig_size"] for t in targets]),
                                            focal=True, top_k=12)
    evaluator = CocoEvaluator(coco, label_to_category_id=[1, 2])
    evaluator.update([t["image_id"] for t in targets], detections)
    return evaluator.summarize()["AP"]


@pytest.mark.slow
def test_tiny_deformable_detr_overfits_two_images():
    torch.manual_seed(0)
    images, mask, targets, coco = synthetic_batch()
    model = tiny_deformable_detr().train()
    criterion = SetCriterion(num_classes=2, matcher=HungarianMatcher(focal=True), focal=True, focal_alpha=0.25)
    groups = {"backbone": [], "linear_proj": [], "default": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
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
        total, _ = criterion.loss_and_metrics(model(images, mask), targets, LossWeights.deformable_detr())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    elapsed = time.perf_counter() - start
    ap_after = coco_ap(model, images, mask, targets, coco)
    print(f"AP {ap_before:.3f} -> {ap_after:.3f} in {STEPS} steps, {elapsed:.1f} s")
    assert ap_before < 0.5
    assert ap_after >= 0.9
