"""Detector forward contract: shapes, aux / two-stage outputs, padding masks, heads, groups."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.deformable_transformer import DeformableTransformer
from pipeline.models.position import PositionEmbeddingSine
from pipeline.models.transformer import Transformer

NUM_CLASSES, QUERIES, DEC_LAYERS = 3, 6, 2


def tiny_config(**overrides) -> DetectorConfig:
    values = dict(
        num_classes=NUM_CLASSES, num_queries=QUERIES, hidden_dim=32, num_feature_levels=4,
        enc_layers=1, dec_layers=DEC_LAYERS, nheads=4, enc_n_points=2, dec_n_points=2,
        dim_feedforward=64, dropout=0.0,
        backbone=BackboneConfig(name="resnet18", out_strides=[8, 16, 32], frozen_bn=True),
    )
    values.update(overrides)
    return DetectorConfig(**values)


def batch(height=64, width=96, padded_width=None):
    torch.manual_seed(0)
    images = torch.randn(2, 3, height, width)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    if padded_width is not None:
        mask[1, :, padded_width:] = True
    return images, mask


VARIANTS = {
    "deformable": dict(kind="deformable"),
    "refine": dict(kind="deformable", box_refine=True),
    "two_stage": dict(kind="deformable", two_stage=True),
    "two_stage_refine": dict(kind="deformable", two_stage=True, box_refine=True),
    "detr": dict(kind="detr"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_contract(variant):
    torch.manual_seed(0)
    cfg = tiny_config(**VARIANTS[variant])
    model = build_detector(cfg).train()
    out = model(*batch(padded_width=70))
    classes = NUM_CLASSES + (1 if cfg.kind == "detr" else 0)
    assert out["pred_logits"].shape == (2, QUERIES, classes)
    assert out["pred_boxes"].shape == (2, QUERIES, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == DEC_LAYERS - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_boxes"].shape == out["pred_boxes"].shape
    assert ("enc_outputs" in out) == cfg.two_stage
    if cfg.two_stage:
        assert out["enc_outputs"]["pred_logits"].shape[-1] == NUM_CLASSES
    loss = out["pred_logits"].sum() + out["pred_boxes"].sum() + sum(a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("transformer.encoder") and p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_aux_loss_off_gives_no_aux_outputs():
    model = build_detector(tiny_config(aux_loss=False))
    assert model(*batch())["aux_outputs"] == []


@pytest.mark.parametrize("variant", ["deformable", "detr"])
def test_batched_equals_per_item(variant):
    torch.manual_seed(0)
    model = build_detector(tiny_config(**VARIANTS[variant])).eval()
    images, mask = batch()
    with torch.no_grad():
        both = model(images, mask)
        first = model(images[:1], mask[:1])
    torch.testing.assert_close(both["pred_boxes"][:1], first["pred_boxes"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both["pred_logits"][:1], first["pred_logits"], atol=1e-5, rtol=1e-4)


def test_position_embedding_ignores_padding():
    embed = PositionEmbeddingSine(8, normalize=True, offset=-0.5)
    small = torch.zeros(1, 5, 7, dtype=torch.bool)
    padded = torch.ones(1, 9, 12, dtype=torch.bool)
    padded[:, :5, :7] = False
    torch.testing.assert_close(embed(padded)[..., :5, :7], embed(small))
    assert embed(small).shape == (1, 16, 5, 7)


def _multi_scale_inputs(sizes, d=16):
    torch.manual_seed(0)
    srcs = [torch.randn(2, d, h, w) for h, w in sizes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in sizes]
    for mask in masks:  # image 1 is padded on the right half of every level
        mask[1, :, mask.shape[-1] // 2 :] = True
    pos = [PositionEmbeddingSine(d // 2)(m) for m in masks]
    return srcs, masks, pos


def test_deformable_transformer_ignores_padded_tokens():
    torch.manual_seed(0)
    transformer = DeformableTransformer(16, 2, 1, 2, 32, 0.0, num_feature_levels=2, dec_n_points=2, enc_n_points=2).eval()
    query_embed = torch.randn(5, 32)
    srcs, masks, pos = _multi_scale_inputs([(6, 8), (3, 4)])
    changed = [torch.where(m[:, None], torch.randn_like(s) * 50, s) for s, m in zip(srcs, masks)]
    with torch.no_grad():
        a = transformer(srcs, masks, pos, query_embed)["hidden"]
        b = transformer(changed, masks, pos, query_embed)["hidden"]
    torch.testing.assert_close(a, b)


def test_detr_transformer_ignores_padded_tokens():
    torch.manual_seed(0)
    transformer = Transformer(16, 2, 1, 2, 32, 0.0).eval()
    srcs, masks, pos = _multi_scale_inputs([(6, 8)])
    changed = torch.where(masks[0][:, None], torch.randn_like(srcs[0]) * 50, srcs[0])
    query = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(transformer(srcs[0], masks[0], query, pos[0]), transformer(changed, masks[0], query, pos[0]))


def test_focal_bias_init_and_shared_heads():
    model = build_detector(tiny_config())
    prior = torch.sigmoid(model.class_embed[0].bias)
    torch.testing.assert_close(prior, torch.full_like(prior, 0.01))
    assert model.class_embed[0] is model.class_embed[1]  # shared without box refinement
    refined = build_detector(tiny_config(box_refine=True))
    assert refined.class_embed[0] is not refined.class_embed[1]


@pytest.mark.parametrize("variant", ["deformable", "refine", "detr"])
def test_reset_class_head_for_new_class_count(variant):
    model = build_detector(tiny_config(**VARIANTS[variant]))
    model.reset_class_head(7)
    out = model(*batch())
    assert out["pred_logits"].shape[-1] == 7 + (1 if variant == "detr" else 0)


def test_param_group_names_body_linear_proj_and_default():
    model = build_detector(tiny_config(backbone=BackboneConfig(name="resnet18", frozen_stages=1)))
    groups = {name: model.param_group(name) for name, _ in model.named_parameters()}
    assert set(groups.values()) == {"backbone", "linear_proj", "default"}
    body = {f"backbone.{name}" for name, _ in model.backbone.named_parameters()}
    assert {name for name, group in groups.items() if group == "backbone"} == body
    linear_proj = [p for name, p in model.named_parameters() if groups[name] == "linear_proj"]
    assert linear_proj and all(p.shape[0] in (2, 4 * 4 * 2 * 2) for p in linear_proj)


def test_extra_levels_are_stride_two_projections():
    model = build_detector(tiny_config(num_feature_levels=5))
    srcs, masks, _ = model.multi_scale_inputs(*batch(height=128, width=128))
    assert [s.shape[-1] for s in srcs] == [16, 8, 4, 2, 1]
    assert [m.shape[-1] for m in masks] == [16, 8, 4, 2, 1]


def test_backbone_freeze_through_detector():
    model = build_detector(tiny_config()).train()
    model.set_backbone_frozen(True)
    out = model(*batch())
    out["pred_boxes"].sum().backward()
    assert all(p.grad is None for p in model.backbone.body.parameters())
    assert model.input_proj[0][0].weight.grad is not None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kind="yolo"), "kind"),
        (dict(hidden_dim=30, nheads=4), "divisible"),
        (dict(num_feature_levels=2), "num_feature_levels"),
        (dict(kind="detr", two_stage=True), "deformable"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_accepts_nested_dict_backbone():
    cfg = tiny_config(backbone={"name": "resnet18", "out_strides": [16, 32]})
    assert isinstance(cfg.backbone, BackboneConfig) and cfg.backbone.out_strides == [16, 32]
    assert math.isclose(cfg.dropout, 0.0)
