"""Masked attention of the segmenter: a query's deformable sampling weights are exactly 0 outside
its mask at every level and renormalised inside, empty masks fall back to full attention, mask
boxes are the masks' tight boxes in unpadded-image coordinates, and the segmenter with masked
attention keeps its output contract, gradients and batched = per-image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pipeline.models.masked_attention as masked_attention
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.mask_head import MaskHeadConfig, SegmenterConfig, build_segmenter
from pipeline.models.masked_attention import (
    boxes_from_masks,
    level_attention_masks,
    masked_sampling_weights,
)
from pipeline.models.position import mask_to_feature
from tests.unit.decoder_probe import record_reference_points

SHAPES = [(12, 16), (6, 8), (3, 4)]


def random_attention(batch=2, queries=5, heads=3, points=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, heads, len(SHAPES) * points, generator=generator)
    weights = logits.softmax(-1).view(batch, queries, heads, len(SHAPES), points)
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=generator) * 1.2 - 0.1
    return weights, locations


def nearest_lookup(allowed: torch.Tensor, locations: torch.Tensor, shape) -> torch.Tensor:
    """Independent check: the allowed-mask value at each location by nearest grid_sample."""
    batch, queries = allowed.shape[:2]
    grid = locations.flatten(2, 3) * 2 - 1  # (B, Q, H * P, 2) in [-1, 1]
    image = allowed.view(batch * queries, 1, *shape).float()
    sampled = F.grid_sample(image, grid.flatten(0, 1)[:, None], mode="nearest", padding_mode="zeros",
                            align_corners=False)
    return sampled.view(batch, queries, *locations.shape[2:4]) > 0.5


def test_weights_outside_the_mask_are_exactly_zero_and_the_rest_sums_to_one():
    weights, locations = random_attention()
    generator = torch.Generator().manual_seed(1)
    allowed = [torch.rand(2, 5, h * w, generator=generator) > 0.6 for h, w in SHAPES]
    out = masked_sampling_weights(weights, locations, allowed, SHAPES)
    assert out.shape == weights.shape
    inside = torch.stack([nearest_lookup(a, locations[:, :, :, lvl], s)
                          for lvl, (a, s) in enumerate(zip(allowed, SHAPES))], 3)
    has_inside = inside.flatten(3).any(-1)  # (B, Q, H)
    assert has_inside.float().mean() > 0.5  # the check below is not vacuous
    assert (out[~inside & has_inside[..., None, None].expand_as(inside)] == 0).all()
    torch.testing.assert_close(out.sum((-2, -1))[has_inside], torch.ones(int(has_inside.sum())))
    # inside the mask the weights keep their ratios
    ratio = out[inside] / weights[inside]
    scale = (1 / (weights * inside).sum((-2, -1), keepdim=True)).expand_as(weights)[inside]
    torch.testing.assert_close(ratio, scale)


def test_a_head_with_no_point_inside_keeps_its_weights():
    weights, locations = random_attention()
    allowed = [torch.zeros(2, 5, h * w, dtype=torch.bool) for h, w in SHAPES]
    allowed[0][1, 2] = True  # image 1, query 2 may attend at level 0 only
    out = masked_sampling_weights(weights, locations, allowed, SHAPES)
    torch.testing.assert_close(out[0], weights[0])
    for head in range(3):
        if out[1, 2, head, 1:].sum() == 0:  # some level-0 point inside: only those keep weight
            torch.testing.assert_close(out[1, 2, head].sum(), torch.tensor(1.0))
        else:
            torch.testing.assert_close(out[1, 2, head], weights[1, 2, head])
    torch.testing.assert_close(out[1, :2], weights[1, :2])


def test_empty_masks_fall_back_to_full_attention_over_the_unpadded_image():
    logits = torch.full((2, 3, 24, 32), -5.0)
    logits[0, 0, 4:12, 8:16] = 5.0  # query 0 of image 0 has a mask; every other is empty
    padding = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in SHAPES]
    for mask, (_, w) in zip(padding, SHAPES):
        mask[1, :, w // 2:] = True  # image 1: right half is padding
    allowed = level_attention_masks(logits, padding)
    assert [tuple(a.shape) for a in allowed] == [(2, 3, h * w) for h, w in SHAPES]
    for level, ((h, w), mask) in enumerate(zip(SHAPES, padding)):
        assert allowed[level][0, 1:].all()  # empty -> everything
        torch.testing.assert_close(allowed[level][1], (~mask[1]).flatten()[None].expand(3, -1))
        assert 0 < allowed[level][0, 0].sum() < h * w
    # with full attention and every point on the unpadded map, the weights are unchanged
    weights, locations = random_attention(queries=3)
    locations = locations.clamp(0.0, 0.49)
    out = masked_sampling_weights(weights, locations, allowed, SHAPES)
    torch.testing.assert_close(out[:, 1:], weights[:, 1:])


def test_mask_boxes_are_tight_boxes_of_the_unpadded_image():
    logits = torch.full((1, 2, 20, 40), -5.0)
    logits[0, 0, 5:10, 4:12] = 5.0
    padding = torch.zeros(1, 20, 40, dtype=torch.bool)
    padding[:, :, 32:] = True  # unpadded width 32 of 40
    boxes, found = boxes_from_masks(logits, padding)
    assert found.tolist() == [[True, False]]
    x0, y0, x1, y1 = 4 / 32, 5 / 20, 12 / 32, 10 / 20
    torch.testing.assert_close(boxes[0, 0], torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]))


def tiny_config(mode: str, **changes) -> SegmenterConfig:
    fields = dict(kind="deformable", num_classes=5, num_queries=8, hidden_dim=32, num_feature_levels=4,
                  enc_layers=1, dec_layers=3, nheads=4, enc_n_points=2, dec_n_points=2, dim_feedforward=64,
                  dropout=0.0, two_stage=True, box_refine=True,
                  backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True))
    return SegmenterConfig(DetectorConfig(**{**fields, **changes}), MaskHeadConfig(mask_dim=16), mask_attention=mode)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    padding_mask = torch.zeros(2, 70, 90, dtype=torch.bool)
    padding_mask[1, 50:] = True
    return torch.randn(2, 3, 70, 90), padding_mask


@pytest.mark.parametrize("mode", ["masked", "masked+boxes"])
def test_every_decoder_layer_samples_inside_its_guiding_masks(batch, mode, monkeypatch):
    calls = []

    def recording(weights, locations, allowed, shapes):
        out = masked_sampling_weights(weights, locations, allowed, shapes)
        calls.append((weights, out, locations, allowed, shapes))
        return out

    monkeypatch.setattr(masked_attention, "masked_sampling_weights", recording)
    torch.manual_seed(0)
    model = build_segmenter(tiny_config(mode)).train()
    out = model(*batch)
    assert len(calls) == 3  # one per decoder layer
    for weights, filtered, locations, allowed, shapes in calls:
        assert [tuple(s) for s in shapes] == [(9, 12), (5, 6), (3, 3), (2, 2)]  # every level
        assert [tuple(a.shape) for a in allowed] == [(2, 8, h * w) for h, w in shapes]
        # the pixel containing each point (mask boxes put points exactly on pixel edges, where
        # nearest rounding would tie: the containing pixel is the rule)
        inside = torch.zeros(filtered.shape, dtype=torch.bool)
        for level, (h, w) in enumerate(shapes):
            for b, q, head, point in torch.cartesian_prod(*map(torch.arange, (2, 8, 4, 2))).tolist():
                x, y = locations[b, q, head, level, point].tolist()
                col, row = int(x * w // 1), int(y * h // 1)
                if 0 <= col < w and 0 <= row < h:
                    inside[b, q, head, level, point] = bool(allowed[level][b, q, row * w + col])
        fell_back = ~inside.flatten(3).any(-1)
        assert (~inside & ~fell_back[..., None, None]).sum() > 0
        assert (filtered[~inside & ~fell_back[..., None, None]] == 0).all()
        torch.testing.assert_close(filtered[fell_back], weights[fell_back])
    assert out["pred_masks"].shape == (2, 8, 18, 23) and len(out["aux_outputs"]) == 2
    loss = out["pred_masks"].sum() + sum(a["pred_masks"].sum() for a in out["aux_outputs"])
    (loss + out["pred_boxes"].sum()).backward()
    assert model.mask_embed.layers[0].weight.grad.abs().sum() > 0


def test_mask_boxes_become_the_reference_boxes(batch):
    torch.manual_seed(0)
    model = build_segmenter(tiny_config("masked+boxes")).eval()
    seen = record_reference_points(model, 1)  # the layer guided by layer 0's masks
    with torch.no_grad():
        out = model(*batch)
    images, padding_mask = batch
    layer0_masks = out["aux_outputs"][0]["pred_masks"]  # the masks that guided layer 1
    expected, found = boxes_from_masks(layer0_masks, mask_to_feature(padding_mask, layer0_masks.shape[-2:]))
    assert found.any()
    level0 = mask_to_feature(padding_mask, (9, 12))
    ratios = torch.stack([(~level0[:, 0]).sum(-1) / 12, (~level0[:, :, 0]).sum(-1) / 9], -1)
    used = seen[0][..., 0, :] / torch.cat([ratios, ratios], -1)[:, None]  # undo the valid-ratio scaling
    torch.testing.assert_close(used[found], expected[found])


def test_masked_segmenter_batched_equals_per_image(batch):
    torch.manual_seed(0)
    model = build_segmenter(tiny_config("masked+boxes")).eval()
    images, padding_mask = batch
    with torch.no_grad():
        both = model(images[:1].expand(2, -1, -1, -1), padding_mask[:1].expand(2, -1, -1))
        single = model(images[:1], padding_mask[:1])
    torch.testing.assert_close(both["pred_masks"][1], single["pred_masks"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both["pred_boxes"][1], single["pred_boxes"][0], atol=1e-4, rtol=1e-4)


def test_masked_attention_adds_no_parameter_and_changes_the_outputs(batch):
    torch.manual_seed(0)
    detector = build_detector(tiny_config("none").detector).eval()
    outputs = {}
    for mode in ("none", "masked", "masked+boxes"):
        model = build_segmenter(tiny_config(mode)).eval()
        report = model.load_state_dict(detector.state_dict(), strict=False)
        assert not report.unexpected_keys
        assert {key.split(".")[0] for key in report.missing_keys} == {"pixel_decoder", "mask_embed"}
        torch.manual_seed(1)
        model.pixel_decoder.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        model.mask_embed.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        with torch.no_grad():
            outputs[mode] = model(*batch)
    # the same weights: masking changes what the queries read; mask boxes change the boxes (the
    # fresh box head predicts no change, so the boxes are the references)
    assert not torch.allclose(outputs["none"]["pred_logits"], outputs["masked"]["pred_logits"])
    assert not torch.allclose(outputs["masked"]["pred_boxes"], outputs["masked+boxes"]["pred_boxes"])


def test_configs_reject_unknown_modes_and_boxes_without_two_stage():
    with pytest.raises(ValueError, match="mask_attention must be one of"):
        tiny_config("dense")
    with pytest.raises(ValueError, match="two_stage"):
        tiny_config("masked+boxes", two_stage=False)
    assert tiny_config("masked", two_stage=False).mask_attention == "masked"


def test_an_export_rebuilds_with_its_mask_attention():
    import dataclasses

    from pipeline.inference.model_io import build_model, spec_from_meta

    cfg = tiny_config("masked+boxes")
    meta = {"kind": "segmenter", "segmenter": dataclasses.asdict(cfg), "class_names": list("abcde")}
    spec = spec_from_meta(meta)
    assert spec.model_cfg.mask_attention == "masked+boxes"
    assert build_model(spec).segmenter_cfg.mask_attention == "masked+boxes"
