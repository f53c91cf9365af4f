"""SetCriterion and the classification losses against values computed by hand in the tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    ClassificationLoss,
    CriterionConfig,
    HungarianMatcher,
    LossWeights,
    MaskLossConfig,
    SetCriterion,
    dice_loss,
    label_smoothing_cross_entropy,
    mask_losses,
    point_sample,
    soft_target_cross_entropy,
)
from pipeline.losses.masks import sigmoid_bce_loss, uncertain_point_coords
from pipeline.losses.set_criterion import average_num_boxes
from pipeline.models.detr import DetectorConfig


class FixedMatcher:
    """Returns given indices, so that a test checks the losses alone."""

    def __init__(self, indices, focal):
        self.indices, self.focal = indices, focal

    def __call__(self, outputs, targets):
        return [(torch.tensor(p, dtype=torch.int64), torch.tensor(t, dtype=torch.int64))
                for p, t in self.indices]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def hand_focal_sum(logits, positives, alpha=0.25, gamma=2.0):
    """Sum over all (query, class) of the focal loss; positives is a set of (query, class)."""
    total = 0.0
    for q, row in enumerate(logits):
        for c, x in enumerate(row):
            p = sigmoid(x)
            if (q, c) in positives:
                total += alpha * (1 - p) ** gamma * -math.log(p)
            else:
                total += (1 - alpha) * p**gamma * -math.log(1 - p)
    return total


def boxes_pair():
    """Two predicted and two target boxes with L1 0.05 + 0.6 and GIoU 0.6 and -0.5 (by hand)."""
    pred = [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]
    target = [[0.55, 0.5, 0.2, 0.2], [0.8, 0.2, 0.2, 0.2]]
    return torch.tensor([pred]), torch.tensor(target)


def test_focal_loss_equals_hand_value_scaled_by_num_queries():
    logits = [[0.3, -1.2], [2.0, 0.5], [-0.7, 1.1]]
    pred_boxes, target_boxes = boxes_pair()
    outputs = {"pred_logits": torch.tensor([logits]), "pred_boxes": pred_boxes}
    targets = [{"labels": torch.tensor([1, 0]), "boxes": target_boxes}]
    criterion = SetCriterion(2, FixedMatcher([([0, 1], [0, 1])], focal=True), focal=True)
    losses = criterion(outputs, targets)
    # mean over the 3 queries, summed, / 2 boxes, times 3 queries == the plain sum / 2 boxes
    expected = hand_focal_sum(logits, {(0, 1), (1, 0)}) / 2
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx((0.05 + 0.6) / 2, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(((1 - 0.6) + (1 + 0.5)) / 2, rel=1e-5)


def test_softmax_cross_entropy_uses_eos_coef_on_no_object():
    logits = [[0.3, -1.2, 0.4], [2.0, 0.5, -0.1], [-0.7, 1.1, 0.9]]  # 2 classes + no-object
    pred_boxes, target_boxes = boxes_pair()
    outputs = {"pred_logits": torch.tensor([logits]), "pred_boxes": pred_boxes}
    targets = [{"labels": torch.tensor([1, 0]), "boxes": target_boxes}]
    criterion = SetCriterion(2, FixedMatcher([([2, 0], [0, 1])], focal=False), focal=False, eos_coef=0.1)
    classes, weights = [0, 2, 1], [1.0, 0.1, 1.0]  # query 1 is unmatched: no-object, weight 0.1
    nll = [-math.log(math.exp(row[c]) / sum(math.exp(x) for x in row)) for row, c in zip(logits, classes)]
    expected = sum(w * n for w, n in zip(weights, nll)) / sum(weights)
    assert criterion(outputs, targets)["loss_ce"].item() == pytest.approx(expected, rel=1e-5)


def test_losses_use_the_hungarian_assignment():
    pred_boxes, target_boxes = boxes_pair()
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": pred_boxes}
    targets = [{"labels": torch.tensor([1, 0]), "boxes": target_boxes}]
    losses = SetCriterion(2, HungarianMatcher())(outputs, targets)
    # the optimal assignment pairs query 0 with target 0 and query 1 with target 1 (as by hand)
    assert losses["loss_bbox"].item() == pytest.approx(0.325, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(0.95, rel=1e-5)


def test_empty_targets_give_zero_box_losses_with_gradients():
    logits = torch.tensor([[[0.3, -1.2], [2.0, 0.5]]], requires_grad=True)
    boxes = torch.rand(1, 2, 4, requires_grad=True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = SetCriterion(2, HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # every query is background; num_boxes is clamped to 1
    assert losses["loss_ce"].item() == pytest.approx(hand_focal_sum(logits[0].tolist(), set()), rel=1e-5)
    SetCriterion.weighted_total(losses, LossWeights()).backward()
    assert torch.equal(boxes.grad, torch.zeros_like(boxes)) and logits.grad.abs().sum() > 0


def test_empty_targets_softmax_trains_all_queries_as_no_object():
    logits = torch.tensor([[[0.3, -1.2, 0.4], [2.0, 0.5, -0.1]]])
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    criterion = SetCriterion(2, HungarianMatcher(focal=False), focal=False)
    losses = criterion({"pred_logits": logits, "pred_boxes": torch.rand(1, 2, 4)}, targets)
    expected = -logits[0].log_softmax(-1)[:, 2].mean()  # same weight everywhere: a plain mean
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def random_outputs(num_aux=2, two_stage=True, num_classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def layer():
        return {"pred_logits": torch.randn(2, 5, num_classes, generator=gen),
                "pred_boxes": torch.rand(2, 5, 4, generator=gen) * 0.5 + 0.2}

    outputs = {**layer(), "aux_outputs": [layer() for _ in range(num_aux)]}
    if two_stage:
        outputs["enc_outputs"] = layer()
    targets = [{"labels": torch.tensor([2, 1]), "boxes": torch.rand(2, 4, generator=gen) * 0.5 + 0.2},
               {"labels": torch.tensor([2]), "boxes": torch.rand(1, 4, generator=gen) * 0.5 + 0.2}]
    return outputs, targets


def test_aux_and_enc_keys_and_weighted_total():
    outputs, targets = random_outputs()
    losses = SetCriterion(3, HungarianMatcher())(outputs, targets)
    base = ["loss_ce", "loss_bbox", "loss_giou"]
    expected_keys = {*base, "class_error", *(f"{k}_{i}" for k in base for i in (0, 1)), *(f"{k}_enc" for k in base)}
    assert set(losses) == expected_keys
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    by_hand = sum(weights["_".join(k.split("_")[:2])] * v for k, v in losses.items() if k != "class_error")
    assert SetCriterion.weighted_total(losses, LossWeights.deformable_detr()).item() == pytest.approx(by_hand.item())
    with pytest.raises(ValueError, match="no weight for loss"):
        SetCriterion.weighted_total({"loss_lovasz_0": torch.tensor(1.0)}, LossWeights.detr())
    assert SetCriterion.weighted_total({"loss_lovasz_0": torch.tensor(1.0)}, LossWeights(extra={"loss_lovasz": 3.0})) == 3.0


def test_detr_and_deformable_weights():
    detr, deformable = LossWeights.detr().as_dict(), LossWeights.deformable_detr().as_dict()
    assert (detr["loss_ce"], detr["loss_bbox"], detr["loss_giou"]) == (1.0, 5.0, 2.0)
    assert (deformable["loss_ce"], deformable["loss_bbox"], deformable["loss_giou"]) == (2.0, 5.0, 2.0)
    assert (detr["loss_mask"], detr["loss_dice"]) == (1.0, 1.0)


def test_encoder_proposals_are_matched_class_agnostically():
    outputs, targets = random_outputs(num_aux=0)
    criterion = SetCriterion(3, HungarianMatcher())
    enc = criterion(outputs, targets)["loss_ce_enc"]
    agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    assert enc.item() == pytest.approx(criterion(outputs["enc_outputs"], agnostic)["loss_ce"].item())
    assert enc.item() != pytest.approx(criterion(outputs["enc_outputs"], targets)["loss_ce"].item())


def test_class_error_is_a_detached_metric():
    logits = torch.tensor([[[5.0, -5.0], [5.0, -5.0], [-5.0, -5.0]]], requires_grad=True)
    pred_boxes, target_boxes = boxes_pair()
    targets = [{"labels": torch.tensor([0, 1]), "boxes": target_boxes}]
    criterion = SetCriterion(2, FixedMatcher([([0, 1], [0, 1])], focal=True))
    losses = criterion({"pred_logits": logits, "pred_boxes": pred_boxes}, targets)
    assert losses["class_error"].item() == pytest.approx(50.0) and not losses["class_error"].requires_grad


def test_bf16_inputs_give_fp32_losses_close_to_fp32():
    outputs, targets = random_outputs()
    bf16 = {"pred_logits": outputs["pred_logits"].bfloat16().requires_grad_(),
            "pred_boxes": outputs["pred_boxes"].bfloat16().requires_grad_()}
    upcast = {k: v.detach().float() for k, v in bf16.items()}
    criterion = SetCriterion(3, HungarianMatcher())
    low, full = criterion(bf16, targets), criterion(upcast, targets)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert low[key].dtype == torch.float32
        assert low[key].item() == pytest.approx(full[key].item(), rel=1e-6)
    SetCriterion.weighted_total(low, LossWeights()).backward()
    assert bf16["pred_logits"].grad.dtype == torch.bfloat16


def test_mismatched_heads_raise_clear_errors():
    outputs, targets = random_outputs(num_classes=3)
    with pytest.raises(ValueError, match="has 3 classes, expected 4"):
        SetCriterion(3, HungarianMatcher(focal=False), focal=False)(outputs, targets)
    with pytest.raises(ValueError, match="same classification head"):
        SetCriterion(3, HungarianMatcher(focal=True), focal=False)
    with pytest.raises(ValueError, match="eos_coef"):
        CriterionConfig(eos_coef=2.0)


def test_build_criterion_from_yaml_like_dicts():
    cfg = CriterionConfig(matcher={"cost_class": 1.0}, weights={"ce": 1.0}, focal_alpha=0.3)
    criterion = SetCriterion.from_config(cfg, num_classes=4, focal=DetectorConfig(kind="detr").focal)
    assert not criterion.focal and not criterion.matcher.focal
    assert criterion.empty_weight.tolist() == pytest.approx([1, 1, 1, 1, 0.1])
    focal = SetCriterion.from_config(cfg, num_classes=4, focal=DetectorConfig(kind="deformable").focal)
    assert focal.focal and focal.matcher.focal and focal.matcher.cost_class == 1.0
    assert focal.focal_alpha == focal.matcher.focal_alpha == 0.3  # one alpha for loss and matching
    assert cfg.weights.as_dict()["loss_ce"] == 1.0


def test_num_boxes_is_clamped_and_local_without_distributed():
    targets = [{"labels": torch.zeros(3)}, {"labels": torch.zeros(2)}]
    assert average_num_boxes(targets, torch.device("cpu")).item() == 5.0
    assert average_num_boxes([{"labels": torch.zeros(0)}], torch.device("cpu")).item() == 1.0


def test_label_smoothing_cross_entropy_by_hand():
    logits, label, s = [1.0, 2.0, 0.5], 1, 0.1
    log_sum_exp = math.log(sum(math.exp(v) for v in logits))
    log_p = [v - log_sum_exp for v in logits]
    expected = -((1 - s) * log_p[label] + s / 3 * sum(log_p))
    got = label_smoothing_cross_entropy(torch.tensor([logits]), torch.tensor([label]), s)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert ClassificationLoss(0.0)(torch.tensor([logits]), torch.tensor([label])).item() == pytest.approx(-log_p[label])


def test_soft_target_cross_entropy_by_hand_and_validation():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    soft = torch.tensor([[0.25, 0.75, 0.0]])
    expected = -(0.25 * F.log_softmax(logits, -1)[0, 0] + 0.75 * F.log_softmax(logits, -1)[0, 1])
    assert soft_target_cross_entropy(logits, soft).item() == pytest.approx(expected.item())
    assert ClassificationLoss()(logits, soft).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="labels must lie in"):
        ClassificationLoss()(logits, torch.tensor([3]))


def _num_boxes_worker(rank: int, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        num_targets = 3 if rank == 0 else 1  # 4 boxes over 2 ranks: every rank divides by 2
        targets = [{"labels": torch.zeros(num_targets, dtype=torch.int64), "boxes": torch.full((num_targets, 4), 0.5)}]
        pred = torch.full((1, 4, 4), 0.5)
        pred[0, :, 0] = 0.6  # each matched box is 0.1 off in L1
        criterion = SetCriterion(1, FixedMatcher([(list(range(num_targets)), list(range(num_targets)))], True))
        losses = criterion({"pred_logits": torch.zeros(1, 4, 1), "pred_boxes": pred}, targets)
        result = {"num_boxes": average_num_boxes(targets, torch.device("cpu")).item(),
                  "loss_bbox": losses["loss_bbox"].item()}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_num_boxes_is_averaged_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_num_boxes_worker, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_boxes"] for r in results] == [2.0, 2.0]
    assert [r["loss_bbox"] for r in results] == pytest.approx([3 * 0.1 / 2, 1 * 0.1 / 2])


def test_dice_and_bce_by_hand():
    logits = torch.tensor([[0.0, 30.0, -30.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0]])
    # p = (0.5, 1, 0): 1 - (2 * 1.5 + 1) / (1.5 + 2 + 1)
    assert dice_loss(logits, targets, 1.0).item() == pytest.approx(1 - 4 / 4.5, rel=1e-5)
    assert sigmoid_bce_loss(logits, targets, 2.0).item() == pytest.approx(math.log(2) / 3 / 2, rel=1e-4)


def test_point_sample_reads_pixel_centres_in_x_y_order():
    image = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4 * row + column
    coords = torch.tensor([[[(2 + 0.5) / 4, (1 + 0.5) / 3], [(0 + 0.5) / 4, (2 + 0.5) / 3]]])
    assert point_sample(image, coords)[0, 0].tolist() == pytest.approx([6.0, 8.0])


def test_uncertain_points_concentrate_on_the_boundary():
    torch.manual_seed(0)
    x = (torch.arange(32.0) + 0.5) / 32
    logits = (40 * (x - 0.5)).expand(2, 1, 32, 32)  # the boundary (logit 0) is the line x = 0.5
    coords = uncertain_point_coords(logits, num_points=200, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert coords.shape == (2, 200, 2) and bool(((coords >= 0) & (coords <= 1)).all())
    # the 150 most uncertain of 600 uniform candidates lie within ~0.125 of the line
    near = ((coords[..., 0] - 0.5).abs() < 0.15).float().mean().item()
    assert near > 0.7  # uniform sampling alone would give 0.3


def _mask_case():
    target = torch.zeros(1, 6, 8, dtype=torch.bool)
    target[0, 1:4, 2:6] = True
    pred = torch.where(target, 2.0, -1.0).float()  # same grid as the target
    return pred, target


def test_full_resolution_mask_losses_by_hand():
    pred, target = _mask_case()
    losses = mask_losses(pred, target, 1.0, MaskLossConfig(num_points=0))
    p_in, p_out = sigmoid(2.0), sigmoid(-1.0)
    bce = (12 * -math.log(p_in) + 36 * -math.log(1 - p_out)) / 48
    dice = 1 - (2 * 12 * p_in + 1) / (12 * p_in + 36 * p_out + 12 + 1)
    assert losses["loss_mask"].item() == pytest.approx(bce, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-5)
    focal = mask_losses(pred, target, 2.0, MaskLossConfig(num_points=0, focal=True))["loss_mask"]
    hand = (12 * 0.25 * (1 - p_in) ** 2 * -math.log(p_in) + 36 * 0.75 * p_out**2 * -math.log(1 - p_out)) / 48 / 2
    assert focal.item() == pytest.approx(hand, rel=1e-5)


def test_point_sampled_losses_approach_full_resolution():
    torch.manual_seed(0)
    target = torch.zeros(1, 60, 80, dtype=torch.bool)
    target[0, 10:40, 20:60] = True  # large enough that the blurred boundary band is a few percent
    pred = torch.where(target, 2.0, -1.0).float()
    full = mask_losses(pred, target, 1.0, MaskLossConfig(num_points=0))
    uniform = mask_losses(pred, target, 1.0, MaskLossConfig(num_points=20000, importance_sample_ratio=0.0))
    for key in ("loss_mask", "loss_dice"):
        assert uniform[key].item() == pytest.approx(full[key].item(), rel=0.1)


def _segm_batch():
    gen = torch.Generator().manual_seed(3)
    masks_a = torch.zeros(2, 8, 12, dtype=torch.bool)
    masks_a[0, :4, :6], masks_a[1, 4:, 6:] = True, True
    masks_b = torch.zeros(1, 6, 10, dtype=torch.bool)  # a smaller image: padded to 8 x 12
    masks_b[0, 1:5, 2:8] = True
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]),
                "masks": masks_a},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.67]]), "masks": masks_b}]
    outputs = {"pred_logits": torch.randn(2, 4, 2, generator=gen),
               "pred_boxes": torch.rand(2, 4, 4, generator=gen) * 0.5 + 0.25,
               "pred_masks": torch.randn(2, 4, 4, 6, generator=gen, requires_grad=True)}
    return outputs, targets


def test_criterion_mask_losses_use_padded_matched_targets():
    outputs, targets = _segm_batch()
    outputs["aux_outputs"] = [{k: v.detach() for k, v in outputs.items()}]
    criterion = SetCriterion(2, HungarianMatcher(), mask_loss=MaskLossConfig(num_points=0))
    losses = criterion(outputs, targets)
    assert {"loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"} <= set(losses)
    indices = criterion.matcher(outputs, targets)
    padded_b = torch.zeros(1, 8, 12)
    padded_b[:, :6, :10] = targets[1]["masks"].float()
    matched_targets = torch.cat([targets[0]["masks"].float()[indices[0][1]], padded_b[indices[1][1]]])
    matched_preds = torch.cat([outputs["pred_masks"][b, indices[b][0]] for b in (0, 1)])
    expected = mask_losses(matched_preds, matched_targets, 3.0, MaskLossConfig(num_points=0))
    assert losses["loss_dice"].item() == pytest.approx(expected["loss_dice"].item(), rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(expected["loss_mask"].item(), rel=1e-6)
    total = SetCriterion.weighted_total(losses, LossWeights(mask=5.0, dice=5.0))
    total.backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0


def test_criterion_masks_need_a_config_and_work_without_targets():
    outputs, targets = _segm_batch()
    with pytest.raises(ValueError, match="no mask loss is configured"):
        SetCriterion(2, HungarianMatcher())(outputs, targets)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
              "masks": torch.zeros(0, 8, 12, dtype=torch.bool)} for _ in range(2)]
    losses = SetCriterion(2, HungarianMatcher(), mask_loss=MaskLossConfig())(outputs, empty)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    losses["loss_dice"].backward()


@pytest.mark.parametrize("focal", [True, False])
def test_batched_classification_loss_against_loops(focal):
    """Two images, random logits and matching: the reference reductions written as loops."""
    gen = torch.Generator().manual_seed(11)
    num_classes, num_queries = 3, 4
    logits = torch.randn(2, num_queries, num_classes + (0 if focal else 1), generator=gen)
    targets = [{"labels": torch.tensor([2, 0, 2]), "boxes": torch.rand(3, 4, generator=gen) * 0.4 + 0.3},
               {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=gen) * 0.4 + 0.3}]
    matching = [([3, 0, 1], [0, 2, 1]), ([2], [0])]
    criterion = SetCriterion(num_classes, FixedMatcher(matching, focal), focal=focal, eos_coef=0.2)
    loss = criterion({"pred_logits": logits, "pred_boxes": torch.rand(2, num_queries, 4)}, targets)["loss_ce"]
    classes = [[num_classes] * num_queries for _ in range(2)]
    for b, (queries, tgts) in enumerate(matching):
        for q, t in zip(queries, tgts):
            classes[b][q] = int(targets[b]["labels"][t])
    if focal:
        positives = [{(q, c) for q, c in enumerate(row) if c < num_classes} for row in classes]
        expected = sum(hand_focal_sum(logits[b].tolist(), positives[b]) for b in range(2)) / 4  # 4 boxes
    else:
        weighted = [(0.2 if c == num_classes else 1.0, -logits[b, q].log_softmax(-1)[c].item())
                    for b in range(2) for q, c in enumerate(classes[b])]
        expected = sum(w * n for w, n in weighted) / sum(w for w, _ in weighted)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_and_metrics_for_a_training_step():
    outputs, targets = random_outputs(num_aux=1, two_stage=False)
    criterion = SetCriterion(3, HungarianMatcher())
    total, metrics = criterion.loss_and_metrics(outputs, targets, LossWeights.deformable_detr())
    losses = criterion(outputs, targets)
    assert total.item() == pytest.approx(SetCriterion.weighted_total(losses, LossWeights()).item())
    assert set(metrics) == set(losses) and all(isinstance(v, float) for v in metrics.values())
    assert metrics["loss_giou_0"] == pytest.approx(losses["loss_giou_0"].item())
