"""The segmenter: output contract, detector weights loading into it, config checks, and the
mask losses' memory bound at 512 x 512 with 100 queries."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.losses import HungarianMatcher, MaskLossConfig, SetCriterion
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.mask_head import MaskHeadConfig, SegmenterConfig, build_segmenter


def tiny_detector_config(**changes) -> DetectorConfig:
    fields = dict(kind="deformable", num_classes=5, num_queries=8, hidden_dim=32, num_feature_levels=4,
                  enc_layers=1, dec_layers=2, nheads=4, enc_n_points=2, dec_n_points=2, dim_feedforward=64,
                  dropout=0.0, backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True))
    return DetectorConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    padding_mask = torch.zeros(2, 70, 90, dtype=torch.bool)
    padding_mask[1, 50:] = True
    return torch.randn(2, 3, 70, 90), padding_mask


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return build_segmenter(SegmenterConfig(tiny_detector_config(), MaskHeadConfig(mask_dim=16)))


def test_forward_gives_quarter_resolution_masks_for_every_decoder_layer(batch, segmenter):
    out = segmenter.train()(*batch)
    assert out["pred_logits"].shape == (2, 8, 5) and out["pred_boxes"].shape == (2, 8, 4)
    assert out["pred_masks"].shape == (2, 8, 18, 23)  # ceil(70 / 4), ceil(90 / 4)
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_masks"].shape == (2, 8, 18, 23)
    (out["pred_masks"].sum() + out["aux_outputs"][0]["pred_masks"].sum()).backward()
    assert segmenter.pixel_decoder.lateral[0].weight.grad.abs().sum() > 0  # the stride-4 map is used
    assert segmenter.mask_embed.layers[0].weight.grad.abs().sum() > 0


def test_pixel_stride_8_reads_the_memory_only(batch):
    model = build_segmenter(SegmenterConfig(tiny_detector_config(), MaskHeadConfig(mask_dim=16, pixel_stride=8)))
    assert model.pixel_decoder.lateral is None
    with torch.no_grad():
        assert model.eval()(*batch)["pred_masks"].shape == (2, 8, 9, 12)


def test_a_detector_export_loads_with_only_the_mask_head_missing(batch):
    torch.manual_seed(0)
    detector = build_detector(tiny_detector_config(two_stage=True, box_refine=True)).eval()
    segmenter = build_segmenter(SegmenterConfig(tiny_detector_config(two_stage=True, box_refine=True))).eval()
    report = segmenter.load_state_dict(detector.state_dict(), strict=False)
    assert not report.unexpected_keys
    assert {key.split(".")[0] for key in report.missing_keys} == {"pixel_decoder", "mask_embed"}
    with torch.no_grad():
        expected, got = detector(*batch), segmenter(*batch)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])
    torch.testing.assert_close(got["enc_outputs"]["pred_boxes"], expected["enc_outputs"]["pred_boxes"])


def test_batched_equals_per_image(batch, segmenter):
    model = segmenter.eval()
    images, padding_mask = batch
    with torch.no_grad():
        both = model(images[:1].expand(2, -1, -1, -1), padding_mask[:1].expand(2, -1, -1))
        single = model(images[:1], padding_mask[:1])
    torch.testing.assert_close(both["pred_masks"][1], single["pred_masks"][0], atol=1e-4, rtol=1e-4)


def test_configs_reject_what_cannot_work():
    with pytest.raises(ValueError, match="pixel_stride"):
        MaskHeadConfig(pixel_stride=2)
    with pytest.raises(ValueError, match="deformable"):
        SegmenterConfig(detector=tiny_detector_config(kind="detr", num_feature_levels=1))
    with pytest.raises(ValueError, match="start at 8"):
        SegmenterConfig(detector=tiny_detector_config(backbone=BackboneConfig(name="resnet10t", out_strides=[16, 32])))
    cfg = SegmenterConfig(detector={"num_classes": 3}, mask_head={"mask_dim": 8})
    assert cfg.detector.num_classes == 3 and cfg.mask_head.mask_dim == 8


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel() * value.element_size())
        return result


def test_mask_losses_stay_bounded_at_512_with_100_queries():
    """A full-resolution (Q, T, H, W) cost or loss would need 100 * 20 * 512^2 * 4 bytes = 2 GB;
    the point-sampled losses and matching costs stay under the size of the padded targets."""
    torch.manual_seed(0)
    num_queries, num_targets, side = 100, 20, 512
    outputs = {"pred_logits": torch.randn(1, num_queries, 5), "pred_boxes": torch.rand(1, num_queries, 4) * 0.5 + 0.25,
               "pred_masks": torch.randn(1, num_queries, side // 4, side // 4, requires_grad=True)}
    targets = [{"labels": torch.randint(0, 5, (num_targets,)), "boxes": torch.rand(num_targets, 4) * 0.5 + 0.25,
                "masks": torch.rand(num_targets, side, side) > 0.5}]
    matcher = HungarianMatcher(focal=True, cost_mask=5.0, cost_dice=5.0)
    criterion = SetCriterion(num_classes=5, matcher=matcher, focal=True, mask_loss=MaskLossConfig())
    with LargestTensor() as tracker:
        losses = criterion(outputs, targets, canvas_size=(side, side))
        (losses["loss_mask"] + losses["loss_dice"]).backward()
    padded_targets = num_targets * side * side * 4  # pad_masks: (T, H, W) fp32, 21 MB
    assert tracker.largest <= padded_targets
    assert tracker.largest < num_queries * num_targets * side * side * 4 / 50



def test_mask_costs_pick_the_query_whose_mask_matches():
    """Two queries with the same class; query 0 has the exact box, query 1 the right mask (the
    top half of a 32 x 48 (h x w) image inside a 64 x 64 canvas) and a slightly worse box."""
    canvas_masks = torch.full((1, 2, 16, 16), -10.0)
    canvas_masks[0, 1, :4, :12] = 10.0  # top half of the image = rows 0-15 of 64, columns 0-47
    target_mask = torch.zeros(1, 32, 48, dtype=torch.bool)
    target_mask[0, :16] = True
    box = [0.5, 0.25, 1.0, 0.5]
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": canvas_masks,
               "pred_boxes": torch.tensor([[box, [0.5, 0.27, 1.0, 0.5]]])}
    # the canvas of the batch is 64 x 64: the other image's mask sets it (DETR's padding rule)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([box]), "masks": target_mask},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
                "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}]
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    assert HungarianMatcher(focal=True)(outputs, targets)[0][0].tolist() == [0]
    matched = HungarianMatcher(focal=True, cost_mask=5.0, cost_dice=5.0)(outputs, targets)
    assert matched[0][0].tolist() == [1] and matched[1][0].tolist() == []


@pytest.mark.parametrize("mode", ["none", "masked+boxes"])
def test_one_model_trains_boxes_and_masks_in_every_layer(batch, mode):
    """The segmenter keeps the detector's box head and losses, with or without masked attention:
    one export detects and segments."""
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(tiny_detector_config(two_stage=True, box_refine=True),
                                            MaskHeadConfig(mask_dim=16), mask_attention=mode)).train()
    images, padding_mask = batch
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
                "masks": torch.rand(2, 70, 90) > 0.5} for _ in range(2)]
    criterion = SetCriterion(num_classes=5, matcher=HungarianMatcher(focal=True), focal=True,
                             mask_loss=MaskLossConfig(num_points=64))
    losses = criterion(model(images, padding_mask), targets, canvas_size=(70, 90))
    for suffix in ("", "_0"):
        assert {f"loss_bbox{suffix}", f"loss_giou{suffix}", f"loss_mask{suffix}", f"loss_dice{suffix}"} <= set(losses)
    assert "loss_bbox_enc" in losses
    (losses["loss_bbox"] + losses["loss_mask"]).backward()
    assert model.bbox_embed[-2].layers[-1].weight.grad.abs().sum() > 0
    assert model.mask_embed.layers[-1].weight.grad.abs().sum() > 0
