"""DINO: contrastive denoising queries, their attention mask, mixed query selection,
look-forward-twice, Group-DETR query groups and the varifocal / denoising losses."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.boxes import box_cxcywh_to_xyxy
from pipeline.losses import CriterionConfig, HungarianMatcher, LossWeights, SetCriterion
from pipeline.losses.denoising import DinoCriterion, build_dino_criterion
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.denoising import (
    DenoisingConfig,
    make_denoising_queries,
    noise_boxes,
    self_attention_mask,
)
from pipeline.weights import load_partial

SIDE = 64


def tiny_cfg(**overrides) -> DetectorConfig:
    values = dict(kind="dino", num_classes=3, num_queries=8, hidden_dim=32, num_feature_levels=3,
                  enc_layers=1, dec_layers=2, nheads=2, enc_n_points=2, dec_n_points=2,
                  dim_feedforward=64, dropout=0.0, two_stage=True, box_refine=True,
                  denoising=DenoisingConfig(dn_number=12),
                  backbone=BackboneConfig(name="resnet10t", out_strides=[8, 16, 32], frozen_bn=True))
    values.update(overrides)
    return DetectorConfig(**values)


def target(labels: list[int], boxes: list[list[float]]) -> dict:
    return {"labels": torch.tensor(labels, dtype=torch.int64),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)}


TARGETS = [target([0, 2, 1], [[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.7, 0.1, 0.1]]),
           target([], []),
           target([1], [[0.5, 0.5, 0.4, 0.3]])]


def images(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIDE, SIDE, generator=generator), torch.zeros(batch, SIDE, SIDE, dtype=torch.bool)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector(tiny_cfg()).train()


# ---- denoising queries and the attention mask ----

def test_denoising_query_shapes_and_layout():
    dn = make_denoising_queries(TARGETS, DenoisingConfig(dn_number=12, label_noise_ratio=0.0), num_classes=3)
    assert (dn.max_boxes, dn.groups) == (3, 2)  # 12 // (2 * 3)
    assert dn.labels.shape == (3, 12) and dn.boxes.shape == (3, 12, 4)
    group = 6
    for g in range(2):  # image 0: three positives then three negatives per group, labels kept
        assert dn.labels[0, g * group : g * group + 3].tolist() == [0, 2, 1]
        assert dn.labels[0, g * group + 3 : (g + 1) * group].tolist() == [0, 2, 1]
    assert (dn.labels[1] == 3).all()  # no box: every slot is padding ("no label" row)
    assert dn.labels[2].tolist() == [1, 3, 3, 1, 3, 3] * 2
    assert make_denoising_queries([target([], [])] * 2, DenoisingConfig(), 3) is None
    assert make_denoising_queries(TARGETS, DenoisingConfig(dn_number=0), 3) is None


def test_positive_noise_stays_inside_negative_noise_outside():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(2000, 1)
    negative = torch.arange(2000) % 2 == 1
    noised = noise_boxes(boxes, negative, 0.4, torch.Generator().manual_seed(0))
    shift = (box_cxcywh_to_xyxy(noised) - box_cxcywh_to_xyxy(boxes)).abs() / (0.4 * 0.1)  # / scale * half side
    assert shift[~negative].max() < 1.0 + 1e-5
    assert shift[negative].min() >= 1.0 - 1e-5 and shift[negative].max() < 2.0 + 1e-5


def test_attention_mask_blocks():
    mask = self_attention_mask(num_dn=8, dn_group_size=4, num_queries=3, query_groups=2)
    assert mask.shape == (14, 14)
    dn0, dn1, match0, match1 = slice(0, 4), slice(4, 8), slice(8, 11), slice(11, 14)
    assert mask[8:, :8].all(), "matching queries must never see denoising queries"
    assert mask[dn0, dn1].all() and mask[dn1, dn0].all(), "denoising groups must not see each other"
    assert not mask[dn0, dn0].any() and not mask[dn1, dn1].any()
    assert not mask[:8, 8:].any(), "denoising queries see the matching ones (as DINO)"
    assert mask[match0, match1].all() and mask[match1, match0].all(), "query groups are independent"
    assert not mask[match0, match0].any() and not mask[match1, match1].any()
    assert self_attention_mask(0, 1, 5, 1) is None


def test_matching_queries_do_not_depend_on_the_denoising_queries(model):
    """The mask at work: the matching part equals the forward without any denoising query."""
    x, mask = images()
    torch.manual_seed(1)
    with_dn = model(x, mask, TARGETS)
    without = model(x, mask)  # no targets: no denoising queries
    assert with_dn["dn_outputs"]["pred_logits"].shape == (3, 12, 3)
    torch.testing.assert_close(with_dn["pred_logits"], without["pred_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], without["pred_boxes"], rtol=1e-4, atol=1e-5)


def test_batched_equals_per_image_for_the_matching_part(model):
    """Other images (and their box counts, which set the denoising groups) change nothing."""
    x, mask = images()
    batched = model(x, mask, TARGETS)
    matcher = HungarianMatcher(focal=True)
    batched_indices = matcher(batched, TARGETS)
    for i in range(3):
        single = model(x[i : i + 1], mask[i : i + 1], [TARGETS[i]])
        torch.testing.assert_close(single["pred_logits"][0], batched["pred_logits"][i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(single["pred_boxes"][0], batched["pred_boxes"][i], rtol=1e-4, atol=1e-5)
        for got, want in zip(matcher(single, [TARGETS[i]])[0], batched_indices[i]):
            assert got.tolist() == want.tolist()


def test_inference_has_no_denoising_and_one_query_group():
    torch.manual_seed(0)
    grouped = build_detector(tiny_cfg(train_query_groups=3))
    x, mask = images()
    train_out = grouped.train()(x, mask, TARGETS)
    assert train_out["pred_logits"].shape == (3, 24, 3) and train_out["query_groups"] == 3
    eval_out = grouped.eval()(x, mask)
    assert eval_out["pred_logits"].shape == (3, 8, 3)
    assert set(eval_out) == {"pred_logits", "pred_boxes", "aux_outputs", "enc_outputs"}
    # group 0 in training is what inference uses: groups do not see each other
    torch.testing.assert_close(train_out["pred_logits"][:, :8], eval_out["pred_logits"], rtol=1e-4, atol=1e-5)


def test_900_queries_and_many_boxes():
    torch.manual_seed(0)
    big = build_detector(tiny_cfg(num_queries=900, denoising=DenoisingConfig(dn_number=100))).train()
    x = torch.randn(2, 3, 256, 256)
    mask = torch.zeros(2, 256, 256, dtype=torch.bool)
    many = target([i % 3 for i in range(60)], torch.rand(60, 2).mul(0.5).add(0.25).repeat(1, 2).mul(
        torch.tensor([1, 1, 0.2, 0.2])).tolist())
    out = big(x, mask, [many, TARGETS[2]])
    assert out["pred_logits"].shape == (2, 900, 3)
    assert out["dn_meta"] == {"groups": 1, "max_boxes": 60}  # 100 // 120 -> at least one group
    assert out["dn_outputs"]["pred_boxes"].shape == (2, 120, 4)
    losses = build_dino_criterion(CriterionConfig(), 3, focal=True)(out, [many, TARGETS[2]])
    assert all(torch.isfinite(v) for v in losses.values())


# ---- look forward twice ----

def test_look_forward_twice_trains_the_previous_layer_box_head():
    torch.manual_seed(0)
    dino = build_detector(tiny_cfg(denoising=DenoisingConfig(dn_number=0))).train()
    x, mask = images()
    dino(x, mask, TARGETS)["pred_boxes"].sum().backward()
    previous_head = dino.bbox_embed[0].layers[-1].weight.grad  # layer 0's head; last layer is 1
    assert previous_head is not None and previous_head.abs().sum() > 0


# ---- losses ----

def criterion(class_loss: str = "focal") -> DinoCriterion:
    return build_dino_criterion(CriterionConfig(class_loss=class_loss), num_classes=2, focal=True)


def hand_case(logit: float = 0.0):
    """One image, one box of class 0, noise off: 2 groups of (positive, negative); zero logits
    and the positives' boxes exactly on the target."""
    tgt = [target([0], [[0.5, 0.5, 0.4, 0.4]])]
    dn = make_denoising_queries(tgt, DenoisingConfig(dn_number=4, label_noise_ratio=0.0, box_noise_scale=0.0), 2)
    assert dn.groups == 2 and torch.allclose(dn.boxes[0], tgt[0]["boxes"].repeat(4, 1))
    dn_out = {"pred_logits": torch.full((1, 4, 2), logit, requires_grad=True), "pred_boxes": dn.boxes.clone(),
              "aux_outputs": []}
    outputs = {"pred_logits": torch.zeros(1, 5, 2), "pred_boxes": torch.rand(1, 5, 4) * 0.5 + 0.25,
               "aux_outputs": [], "dn_outputs": dn_out, "dn_meta": {"groups": dn.groups, "max_boxes": dn.max_boxes},
               "query_groups": 1}
    return outputs, tgt


def test_denoising_loss_values_by_hand():
    outputs, tgt = hand_case()
    losses = criterion()(outputs, tgt)
    # focal at p = 0.5: alpha_t * 0.25 * ln 2 per (slot, class); 2 positive entries (alpha 0.25),
    # 6 negative ones (0.75); summed (mean over slots x slots) / (num_boxes 1 x groups 2)
    expected_ce = (2 * 0.25 + 6 * 0.75) * 0.25 * math.log(2) / 2
    assert losses["loss_ce_dn"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou_dn"].item() == pytest.approx(0.0, abs=1e-6)
    # varifocal: the positives' target is their IoU (1 here), weight 1; negatives 0.75 * 0.5^2
    vfl = criterion("varifocal")(outputs, tgt)["loss_ce_dn"].item()
    assert vfl == pytest.approx((2 * 1.0 + 6 * 0.75 * 0.25) * math.log(2) / 2, rel=1e-5)


def test_negatives_are_trained_toward_no_object():
    outputs, tgt = hand_case(logit=2.0)
    criterion()(outputs, tgt)["loss_ce_dn"].backward()
    grad = outputs["dn_outputs"]["pred_logits"].grad[0]  # slots: pos, neg (group 0), pos, neg
    assert (grad[[1, 3]] > 0).all(), "gradient descent must lower every class of a negative"
    assert (grad[[0, 2], 0] < 0).all(), "and raise the positive's class"
    assert (grad[[0, 2], 1] > 0).all()


def test_varifocal_target_is_the_iou_of_the_matched_box():
    outputs, tgt = hand_case()
    dn = outputs["dn_outputs"]
    shifted = {**dn, "pred_boxes": dn["pred_boxes"] + torch.tensor([0.2, 0.0, 0.0, 0.0])}  # IoU 1/3
    low = criterion("varifocal")({**outputs, "dn_outputs": shifted}, tgt)["loss_ce_dn"].item()
    # positives: BCE(0, 1/3) = ln 2 (logit 0 gives ln 2 whatever the target), weight 1/3
    assert low == pytest.approx((2 / 3 + 6 * 0.75 * 0.25) * math.log(2) / 2, rel=1e-4)


def test_query_groups_average_to_the_single_group_loss():
    outputs, tgt = hand_case()
    single = {k: v for k, v in outputs.items() if k not in ("dn_outputs", "dn_meta")}
    doubled = {**single, "query_groups": 2,
               "pred_logits": single["pred_logits"].repeat(1, 2, 1), "pred_boxes": single["pred_boxes"].repeat(1, 2, 1)}
    one, two = criterion()(single, tgt), criterion()(doubled, tgt)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert two[key].item() == pytest.approx(one[key].item(), rel=1e-6)


def test_empty_targets_every_key_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    dino = build_detector(tiny_cfg(train_query_groups=2)).train()
    x, mask = images(2)
    empty = [target([], []), target([], [])]
    out = dino(x, mask, empty)
    assert out["dn_outputs"] is None
    crit = build_dino_criterion(CriterionConfig(), num_classes=3, focal=True)
    losses = crit(out, empty)
    with_boxes = crit(dino(x, mask, TARGETS[:2]), TARGETS[:2])
    assert set(losses) == set(with_boxes), "ranks with and without boxes log the same keys"
    total = SetCriterion.weighted_total(losses, LossWeights())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in dino.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient (a DeepSpeed rank would wait forever): {missing}"


def test_dino_export_loads_partially_into_deformable_detr():
    torch.manual_seed(0)
    dino = build_detector(tiny_cfg())
    deformable = build_detector(tiny_cfg(kind="deformable"))
    report = load_partial(deformable, dino.state_dict())
    unexpected = set(report.unexpected)
    assert {"label_enc.weight", "transformer.tgt_embed.weight"} <= unexpected
    assert any(k.startswith("transformer.decoder.ref_point_head") for k in unexpected)
    assert not report.mismatched
    torch.testing.assert_close(deformable.transformer.encoder.layers[0].linear1.weight,
                               dino.transformer.encoder.layers[0].linear1.weight)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="train_query_groups"):
        DetectorConfig(kind="deformable", train_query_groups=2)
    with pytest.raises(ValueError, match="box_refine"):
        build_detector(tiny_cfg(box_refine=False))
    with pytest.raises(ValueError, match="class_loss"):
        CriterionConfig(class_loss="bce")
    with pytest.raises(ValueError, match="dn_number"):
        DenoisingConfig(dn_number=-1)
