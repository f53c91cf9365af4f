"""The decoder trace hands out the tensors the model used, not a recomputation beside it."""

from __future__ import annotations

import pytest
import torch

import pipeline.models.ops.ms_deform_attn_module as attn_module
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.ops import MSDeformAttn
from pipeline.models.trace import record_decoder

DEC_LAYERS, QUERIES = 2, 5


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    values = dict(num_classes=3, num_queries=QUERIES, hidden_dim=32, num_feature_levels=4,
                  enc_layers=1, dec_layers=DEC_LAYERS, nheads=4, enc_n_points=2, dec_n_points=2,
                  dim_feedforward=64, dropout=0.0,
                  backbone=BackboneConfig(name="resnet18", out_strides=[8, 16, 32]))
    values.update(overrides)
    return build_detector(DetectorConfig(**values)).eval()


def inputs(padded_width: int | None = 80):
    torch.manual_seed(1)
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    if padded_width is not None:
        mask[:, :, padded_width:] = True
    return images, mask


KINDS = {"deformable": {}, "refine_two_stage": dict(two_stage=True, box_refine=True),
         "dino": dict(kind="dino", two_stage=True, box_refine=True)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sampling_points_are_the_tensors_the_op_sampled(kind, monkeypatch):
    seen = []
    real_op = attn_module.ms_deform_attn

    def spy(value, shapes, locations, weights):
        seen.append((locations, weights))
        return real_op(value, shapes, locations, weights)

    monkeypatch.setattr(attn_module, "ms_deform_attn", spy)
    model = tiny(**KINDS[kind])
    with torch.no_grad(), record_decoder(model) as trace:
        outputs = model(*inputs())
    decoder_calls = seen[-DEC_LAYERS:]  # the encoder's calls come first
    assert len(trace.attention) == DEC_LAYERS
    for (locations, weights), layer in zip(decoder_calls, trace.attention):
        # the same storage, not an equal copy that a recomputation could also give
        assert layer["sampling_locations"].data_ptr() == locations.data_ptr()
        assert layer["attention_weights"].data_ptr() == weights.data_ptr()
        assert torch.equal(layer["sampling_locations"], locations)
        assert layer["sampling_locations"].shape == (1, QUERIES, 4, 4, 2, 2)
    assert torch.equal(trace.layer_boxes[-1], outputs["pred_boxes"])
    assert torch.equal(trace.layer_logits[-1], outputs["pred_logits"])
    for layer, aux in enumerate(outputs["aux_outputs"]):
        assert torch.equal(trace.layer_boxes[layer], aux["pred_boxes"])
    assert trace.valid_ratios.shape == (1, 4, 2) and float(trace.valid_ratios[0, 0, 0]) < 1.0


def test_image_locations_undo_the_padding():
    model = tiny()
    with torch.no_grad(), record_decoder(model) as trace:
        model(*inputs())
    located = trace.image_locations(0)
    ratio = trace.valid_ratios[0, 2, 0]
    assert torch.allclose(located[0, :, :, 2, :, 0] * ratio,
                          trace.sampling_locations[0][0, :, :, 2, :, 0])


def test_nothing_recorded_outside_the_block():
    model = tiny()
    with torch.no_grad(), record_decoder(model) as trace:
        model(*inputs())
    assert all(m.trace is None for m in model.modules() if isinstance(m, MSDeformAttn))
    assert model.decoder_trace is None and model.transformer.decoder.decoder_trace is None
    with torch.no_grad():
        model(*inputs())
    assert len(trace.attention) == DEC_LAYERS  # the second forward added nothing


def test_single_scale_detr_gives_layer_boxes_without_points():
    model = tiny(kind="detr")
    with torch.no_grad(), record_decoder(model) as trace:
        outputs = model(*inputs(None))
    assert trace.attention == [] and trace.valid_ratios is None
    assert torch.equal(trace.layer_boxes[-1], outputs["pred_boxes"])
