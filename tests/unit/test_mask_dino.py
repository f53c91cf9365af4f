"""Mask DINO in the segmenter: unified query selection (the encoder's top-k tokens predict the
masks that guide decoder layer 0, and the boxes of that layer with masked+boxes; their mask loss
"_enc") and masks for DINO's denoising queries ("_dn" mask losses of the positives only), with
0-box images and batches, the denoising attention mask and the inference contract kept."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pipeline.models.dino as dino
import pipeline.models.masked_attention as masked_attention
from pipeline.losses import CriterionConfig, LossWeights, MaskLossConfig, SetCriterion
from pipeline.losses.denoising import build_dino_criterion
from pipeline.losses.masks import mask_losses
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.denoising import DenoisingConfig
from pipeline.models.mask_head import MaskHeadConfig, SegmenterConfig, build_segmenter
from pipeline.models.masked_attention import boxes_from_masks
from pipeline.models.position import mask_to_feature
from tests.unit.decoder_probe import record_reference_points

HEIGHT, WIDTH = 64, 80  # image 1 is padded below row 48
NUM_QUERIES = 8


def tiny_config(kind: str = "dino", mode: str = "masked+boxes", unified: bool | None = None,
                **changes) -> SegmenterConfig:
    fields = dict(kind=kind, num_classes=5, num_queries=NUM_QUERIES, hidden_dim=32, num_feature_levels=4,
                  enc_layers=1, dec_layers=2, nheads=4, enc_n_points=2, dec_n_points=2, dim_feedforward=64,
                  dropout=0.0, two_stage=True, box_refine=True, denoising=DenoisingConfig(dn_number=8),
                  backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True))
    return SegmenterConfig(DetectorConfig(**{**fields, **changes}), MaskHeadConfig(mask_dim=16),
                           mask_attention=mode, unified_query_selection=unified)


def make_model(cfg: SegmenterConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_segmenter(cfg)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    padding_mask = torch.zeros(2, HEIGHT, WIDTH, dtype=torch.bool)
    padding_mask[1, 48:] = True
    return torch.randn(2, 3, HEIGHT, WIDTH, generator=generator), padding_mask


def rectangles(boxes: list[tuple[int, int, int, int]], size: tuple[int, int]) -> dict:
    """Targets of pixel rectangles (x0, y0, x1, y1) in an unpadded image of ``size`` (h, w)."""
    h, w = size
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    normalised = []
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = True
        normalised.append([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
    return {"labels": torch.arange(len(boxes), dtype=torch.int64) % 5,
            "boxes": torch.tensor(normalised, dtype=torch.float32).reshape(-1, 4), "masks": masks}


TARGETS = [rectangles([(4, 6, 30, 40), (40, 10, 76, 60)], (HEIGHT, WIDTH)),
           rectangles([(10, 8, 50, 40)], (48, WIDTH))]
ONE_EMPTY = [TARGETS[0], rectangles([], (48, WIDTH))]
ALL_EMPTY = [rectangles([], (HEIGHT, WIDTH)), rectangles([], (48, WIDTH))]


def criterion_for(model) -> SetCriterion:
    cfg = CriterionConfig(masks=MaskLossConfig(num_points=64))
    return build_dino_criterion(cfg, num_classes=5, focal=True)


class Recorder:
    """Records the mask logits of every level_attention_masks call (one per decoder layer)."""

    def __init__(self, monkeypatch):
        self.logits: list[torch.Tensor] = []
        original = masked_attention.level_attention_masks

        def recording(logits, *args, **kwargs):
            self.logits.append(logits.detach().clone())
            return original(logits, *args, **kwargs)

        monkeypatch.setattr(masked_attention, "level_attention_masks", recording)


def record_denoising(monkeypatch) -> list:
    made = []
    original = dino.make_denoising_queries

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(dino, "make_denoising_queries", recording)
    return made


# ---- config ----

def test_unified_selection_defaults_on_with_masked_attention_and_two_stage_only():
    assert tiny_config(mode="masked").unified_query_selection is True
    assert tiny_config(mode="masked+boxes").unified_query_selection is True
    assert tiny_config(mode="none").unified_query_selection is False
    assert tiny_config("deformable", "masked", two_stage=False).unified_query_selection is False
    assert tiny_config(mode="none", unified=True).unified_query_selection is True  # the loss only
    with pytest.raises(ValueError, match="unified_query_selection: true needs model.detector.two_stage"):
        tiny_config("deformable", "masked", unified=True, two_stage=False)
    with pytest.raises(ValueError, match="detector.kind must be one of"):
        tiny_config("detr", "none", num_feature_levels=1, two_stage=False, box_refine=False)


def test_an_export_rebuilds_with_its_switch_and_an_older_one_without_it():
    from pipeline.inference.model_io import build_model, spec_from_meta

    cfg = tiny_config()
    meta = {"kind": "segmenter", "segmenter": dataclasses.asdict(cfg), "class_names": list("abcde")}
    model = build_model(spec_from_meta(meta))
    assert type(model).__name__ == "DINOSegmenter" and model.segmenter_cfg.unified_query_selection
    del meta["segmenter"]["unified_query_selection"]  # exported before the switch: trained without
    assert spec_from_meta(meta).model_cfg.unified_query_selection is False


def test_a_dino_export_loads_with_only_the_mask_head_missing():
    cfg = tiny_config()
    detector = build_detector(cfg.detector)
    report = make_model(cfg).load_state_dict(detector.state_dict(), strict=False)
    assert not report.unexpected_keys
    assert {key.split(".")[0] for key in report.missing_keys} == {"pixel_decoder", "mask_embed"}


# ---- unified query selection ----

@pytest.mark.parametrize("kind,groups", [("deformable", 1), ("dino", 1), ("dino", 2)])
def test_first_layer_is_guided_by_the_selected_tokens_masks(batch, monkeypatch, kind, groups):
    cfg = tiny_config(kind, "masked+boxes", train_query_groups=groups)
    model = make_model(cfg).train()
    recorder, made = Recorder(monkeypatch), record_denoising(monkeypatch)
    seen = record_reference_points(model, 0)
    targets = TARGETS if kind == "dino" else None
    out = model(*batch, targets)
    selected = out["enc_selected"]["pred_masks"]  # (B, K, h, w)
    assert selected.shape == (2, NUM_QUERIES, 16, 20)
    num_dn = made[0].num_slots if kind == "dino" else 0
    assert len(recorder.logits) == cfg.detector.dec_layers
    layer0 = recorder.logits[0]
    assert layer0.shape == (2, num_dn + groups * NUM_QUERIES, 16, 20)
    torch.testing.assert_close(layer0[:, num_dn:], selected.detach().repeat(1, groups, 1, 1))

    # masked+boxes: the matching queries start from the tight boxes of those masks; the
    # denoising ones from their noised ground-truth boxes
    padding = mask_to_feature(batch[1], (16, 20))
    boxes, found = boxes_from_masks(selected.repeat(1, groups, 1, 1), padding)
    assert found.any()
    level0 = mask_to_feature(batch[1], (8, 10))
    ratios = torch.stack([(~level0[:, 0]).sum(-1) / 10, (~level0[:, :, 0]).sum(-1) / 8], -1)
    used = seen[0][..., 0, :] / torch.cat([ratios, ratios], -1)[:, None]  # undo the valid-ratio scaling
    torch.testing.assert_close(used[:, num_dn:][found], boxes[found])
    if num_dn:
        torch.testing.assert_close(used[:, :num_dn], made[0].boxes)

    # without the switch layer 0 is guided by the initial queries' own masks: different ones
    model.segmenter_cfg.unified_query_selection = False
    recorder.logits.clear()
    without = model(*batch, targets)
    assert "enc_selected" not in without
    assert not torch.allclose(recorder.logits[0][:, -NUM_QUERIES:], selected.detach(), atol=1e-3)


@pytest.mark.parametrize("kind,mode", [("deformable", "masked"), ("dino", "masked+boxes"), ("dino", "none")])
def test_the_selected_tokens_mask_loss_is_finite_and_trains_the_encoder(batch, kind, mode):
    model = make_model(tiny_config(kind, mode, unified=True)).train()
    targets = TARGETS if kind == "dino" else None
    losses = criterion_for(model)(model(*batch, targets), TARGETS, canvas_size=(HEIGHT, WIDTH))
    for key in ("loss_mask_enc", "loss_dice_enc", "loss_bbox_enc", "loss_mask", "loss_mask_0"):
        assert torch.isfinite(losses[key]) and losses[key] > 0, key
    (losses["loss_mask_enc"] + losses["loss_dice_enc"]).backward()
    # the selected tokens' features, hence the selection, learn from their masks
    assert model.transformer.enc_output.weight.grad.abs().sum() > 0
    assert model.transformer.encoder.layers[0].linear2.weight.grad.abs().sum() > 0


def test_inference_returns_the_same_keys_and_shapes_with_and_without_the_switch(batch):
    for kind in ("deformable", "dino"):
        shapes = []
        for unified in (False, True):
            model = make_model(tiny_config(kind, "masked+boxes", unified=unified)).eval()
            with torch.no_grad():
                out = model(*batch)
            shapes.append({key: tuple(value.shape) if torch.is_tensor(value) else
                           [{k: tuple(v.shape) for k, v in layer.items()} for layer in value]
                           if isinstance(value, list) else {k: tuple(v.shape) for k, v in value.items()}
                           for key, value in out.items()})
        assert shapes[0] == shapes[1]
        assert set(shapes[1]) == {"pred_logits", "pred_boxes", "pred_masks", "aux_outputs", "enc_outputs"}
        assert shapes[1]["pred_masks"] == (2, NUM_QUERIES, 16, 20)


# ---- denoising masks ----

def test_denoising_queries_predict_masks_in_training_only(batch):
    model = make_model(tiny_config()).train()
    out = model(*batch, TARGETS)
    num_dn = out["dn_meta"]["groups"] * 2 * out["dn_meta"]["max_boxes"]
    assert out["dn_outputs"]["pred_masks"].shape == (2, num_dn, 16, 20)
    assert out["dn_outputs"]["aux_outputs"][0]["pred_masks"].shape == (2, num_dn, 16, 20)
    assert out["pred_masks"].shape == (2, NUM_QUERIES, 16, 20)
    losses = criterion_for(model)(out, TARGETS, canvas_size=(HEIGHT, WIDTH))
    for key in ("loss_mask_dn", "loss_dice_dn", "loss_mask_dn_0", "loss_dice_dn_0"):
        assert torch.isfinite(losses[key]) and losses[key] > 0, key
    with torch.no_grad():
        evaluated = model.eval()(*batch)
    assert "dn_outputs" not in evaluated
    assert not any("_dn" in key for key in criterion_for(model)(evaluated, TARGETS, canvas_size=(HEIGHT, WIDTH)))


def hand_built_outputs(dn_masks: torch.Tensor) -> dict:
    """Outputs of 4 queries and one denoising group (M = 2): per image slots [pos 0, pos 1,
    neg 0, neg 1]; image 1 has one target, so its slots 1 and 3 are padding."""
    generator = torch.Generator().manual_seed(0)

    def layer(queries, masks):
        return {"pred_logits": torch.randn(2, queries, 5, generator=generator),
                "pred_boxes": torch.rand(2, queries, 4, generator=generator) * 0.5 + 0.25, "pred_masks": masks}

    outputs = {**layer(4, torch.randn(2, 4, 16, 20, generator=generator)), "aux_outputs": []}
    outputs["dn_outputs"] = {**layer(4, dn_masks), "aux_outputs": []}
    outputs["dn_meta"] = {"groups": 1, "max_boxes": 2}
    return outputs


def test_denoising_mask_losses_count_the_positives_only():
    crit = build_dino_criterion(CriterionConfig(masks=MaskLossConfig(num_points=0)), num_classes=5, focal=True)
    canvas = (HEIGHT, WIDTH)
    generator = torch.Generator().manual_seed(1)
    dn_masks = torch.randn(2, 4, 16, 20, generator=generator)
    base = crit(hand_built_outputs(dn_masks), TARGETS, canvas)
    # the positives: image 0 slots 0, 1 (targets 0, 1), image 1 slot 0 (target 0); 3 boxes, 1 group
    padded = [torch.nn.functional.pad(t["masks"].float(), (0, WIDTH - t["masks"].shape[-1],
                                                             0, HEIGHT - t["masks"].shape[-2])) for t in TARGETS]
    expected = mask_losses(torch.cat([dn_masks[0, :2], dn_masks[1, :1]]), torch.cat([padded[0], padded[1][:1]]),
                           3.0, MaskLossConfig(num_points=0))
    torch.testing.assert_close(base["loss_mask_dn"], expected["loss_mask"])
    torch.testing.assert_close(base["loss_dice_dn"], expected["loss_dice"])
    # negatives and padding predicting their object's mask (or anything else) change nothing
    changed = dn_masks.clone()
    changed[0, 2:] = torch.where(torch.nn.functional.interpolate(padded[0][None], (16, 20))[0] > 0.5, 9.0, -9.0)
    changed[1, 1:] = -dn_masks[1, 1:]
    again = crit(hand_built_outputs(changed), TARGETS, canvas)
    for key in ("loss_mask_dn", "loss_dice_dn"):
        torch.testing.assert_close(again[key], base[key])
    changed[1, 0] = -dn_masks[1, 0]  # a positive does
    assert crit(hand_built_outputs(changed), TARGETS, canvas)["loss_mask_dn"] != base["loss_mask_dn"]


def test_matching_queries_do_not_see_the_denoising_ones(batch):
    model = make_model(tiny_config()).train()
    with_dn = model(*batch, TARGETS)
    model.cfg.denoising = DenoisingConfig(dn_number=0)
    without = model(*batch, TARGETS)
    assert with_dn["dn_outputs"] is not None and without["dn_outputs"] is None
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(with_dn[key], without[key], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(with_dn["aux_outputs"][0][key], without["aux_outputs"][0][key],
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("targets", [ONE_EMPTY, ALL_EMPTY], ids=["an_empty_image", "an_empty_batch"])
def test_zero_boxes_keep_every_key_and_give_every_parameter_a_gradient(batch, targets):
    model = make_model(tiny_config()).train()
    out = model(*batch, targets)
    assert out["pred_masks"].shape == (2, NUM_QUERIES, 16, 20)
    assert out["enc_selected"]["pred_masks"].shape == (2, NUM_QUERIES, 16, 20)
    if targets is ONE_EMPTY:
        assert out["dn_outputs"]["pred_masks"].shape[:2] == (2, out["dn_meta"]["groups"] * 4)
    else:
        assert out["dn_outputs"] is None
    crit = criterion_for(model)
    losses = crit(out, targets, canvas_size=(HEIGHT, WIDTH))
    # ranks log the same keys whatever their batch holds
    full = crit(model(*batch, TARGETS), TARGETS, canvas_size=(HEIGHT, WIDTH))
    assert set(losses) == set(full)
    assert all(torch.isfinite(value) for value in losses.values())
    SetCriterion.weighted_total(losses, LossWeights()).backward()
    # the DDP / DeepSpeed hang rule: no trainable parameter may be left without a gradient
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_a_plain_set_criterion_refuses_denoising_outputs(batch):
    model = make_model(tiny_config()).train()
    crit = SetCriterion.from_config(CriterionConfig(masks=MaskLossConfig(num_points=64)), 5, True)
    with pytest.raises(ValueError, match="build_dino_criterion"):
        crit(model(*batch, TARGETS), TARGETS, canvas_size=(HEIGHT, WIDTH))
