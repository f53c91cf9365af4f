"""Official DETR / Deformable DETR layouts: a state dict renamed to official names loads back
through the key map and gives the same outputs."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.interop import (
    load_official_state_dict,
    official_to_ours,
    ours_to_official,
    to_official_state_dict,
)

VARIANTS = {
    "deformable": dict(kind="deformable"),
    "refine_two_stage": dict(kind="deformable", box_refine=True, two_stage=True),
    "detr": dict(kind="detr"),
}


def tiny_config(**overrides) -> DetectorConfig:
    values = dict(
        num_classes=4, num_queries=5, hidden_dim=32, enc_layers=1, dec_layers=2, nheads=4,
        enc_n_points=2, dec_n_points=2, dim_feedforward=64, dropout=0.0,
        backbone=BackboneConfig(name="resnet18", out_strides=[8, 16, 32]),
    )
    values.update(overrides)
    return DetectorConfig(**values)


def test_key_map_examples_from_the_official_layouts():
    assert official_to_ours("backbone.0.body.layer1.0.conv1.weight") == "backbone.body.layer1.0.conv1.weight"
    assert official_to_ours("transformer.encoder.layers.0.self_attn.sampling_offsets.weight") == (
        "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
    )
    assert official_to_ours("bbox_embed.0.layers.2.bias") == "bbox_embed.0.layers.2.bias"
    assert official_to_ours("input_proj.0.1.weight") == "input_proj.0.1.weight"
    assert official_to_ours("transformer.decoder.bbox_embed.3.layers.0.weight") is None
    assert ours_to_official("backbone.body.bn1.running_var") == "backbone.0.body.bn1.running_var"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_round_trip_gives_equal_outputs(variant):
    cfg = tiny_config(**VARIANTS[variant])
    torch.manual_seed(0)
    source = build_detector(cfg).eval()
    torch.manual_seed(1)
    target = build_detector(tiny_config(**VARIANTS[variant])).eval()
    official = to_official_state_dict(source)
    assert any(k.startswith("backbone.0.body.") for k in official)
    assert "query_embed.weight" in official or cfg.two_stage
    report = load_official_state_dict(target, {"model": official, "epoch": 49})
    assert report.unexpected == [] and report.missing == [] and report.mismatched == []
    assert bool(report.skipped) == cfg.box_refine
    images = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        expected, got = source(images, mask), target(images, mask)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])


def test_other_class_count_loads_all_but_class_heads(tmp_path):
    torch.manual_seed(0)
    source = build_detector(tiny_config(num_classes=91))
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": to_official_state_dict(source)}, path)
    target = build_detector(tiny_config(num_classes=4))
    report = load_official_state_dict(target, path)
    assert report.mismatched and all(key.startswith("class_embed.") for key, _, _ in report.mismatched)
    assert report.missing == []  # mismatched heads are listed once, not also as missing
    torch.testing.assert_close(target.query_embed.weight, source.query_embed.weight)


def test_unknown_keys_are_reported_not_loaded():
    model = build_detector(tiny_config())
    state = to_official_state_dict(model)
    state["transformer.decoder.layers.9.norm1.weight"] = torch.ones(32)
    report = load_official_state_dict(model, state)
    assert report.unexpected == ["transformer.decoder.layers.9.norm1.weight"]
    assert "unexpected (1)" in report.summary()
