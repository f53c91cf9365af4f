"""The batched matching path (each image against its own targets, padded; all decoder layers in
one call; assignment.py) gives exactly the assignments of the previous all-pairs, per-layer path,
kept here as a reference."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

import pipeline.losses.assignment as assignment
from pipeline.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from pipeline.losses import HungarianMatcher, SetCriterion
from pipeline.losses.assignment import indices_to, solve_padded
from pipeline.losses.denoising import DinoCriterion

NUM_CLASSES = 5


@torch.no_grad()
def reference_cost(matcher: HungarianMatcher, outputs: dict, targets: list[dict]) -> torch.Tensor:
    """The previous cost: every query of the batch against every target of the batch."""
    batch_size, num_queries = outputs["pred_logits"].shape[:2]
    logits = outputs["pred_logits"].flatten(0, 1).float()
    boxes = outputs["pred_boxes"].flatten(0, 1).float()
    labels = torch.cat([t["labels"] for t in targets]).long()
    tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
    cost = (matcher.cost_class * matcher.classification_cost(logits, labels)
            + matcher.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            - matcher.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)))
    return cost.view(batch_size, num_queries, len(labels))


def reference_match(matcher: HungarianMatcher, outputs: dict, targets: list[dict]) -> list:
    """The previous forward: all-pairs cost, split per image, scipy on each block."""
    cost = matcher.replace_nonfinite(reference_cost(matcher, outputs, targets))
    blocks = cost.split([len(t["boxes"]) for t in targets], dim=-1)
    return [tuple(torch.as_tensor(x, dtype=torch.int64) for x in linear_sum_assignment(block[i].numpy()))
            for i, block in enumerate(blocks)]


class ReferenceMatcher(HungarianMatcher):
    def forward(self, outputs: dict, targets: list[dict]) -> list:
        return reference_match(self, outputs, targets)

    def match_layers(self, layers: list[dict], targets: list[dict]) -> list:
        return [self(layer, targets) for layer in layers]


def layer(batch: int, queries: int, focal: bool, gen: torch.Generator) -> dict:
    logits = torch.randn(batch, queries, NUM_CLASSES + (0 if focal else 1), generator=gen)
    return {"pred_logits": logits, "pred_boxes": torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.1}


def problem(sizes: list[int], queries: int, focal: bool, layers: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    outputs = {**layer(len(sizes), queries, focal, gen),
               "aux_outputs": [layer(len(sizes), queries, focal, gen) for _ in range(layers - 1)]}
    targets = [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
                "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.1} for n in sizes]
    return outputs, targets


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (p0, t0), (p1, t1) in zip(got, want):
        assert p0.dtype == torch.int64 and t0.dtype == torch.int64
        assert torch.equal(p0, p1) and torch.equal(t0, t1)


SIZES = [[3, 0, 7, 1], [0, 0], [1], [5, 5], [12, 2, 0, 9, 1, 4, 4, 6]]


@pytest.mark.parametrize("focal", [True, False])
@pytest.mark.parametrize("sizes", SIZES)
def test_every_layer_matches_like_the_reference(focal, sizes):
    queries = 5 if sizes == [5, 5] else 30  # [5, 5]: as many queries as boxes
    outputs, targets = problem(sizes, queries, focal, layers=3, seed=len(sizes))
    layers = [outputs, *outputs["aux_outputs"]]
    matcher = HungarianMatcher(focal=focal)
    batched = matcher.match_layers(layers, targets)
    for one_layer, got in zip(layers, batched):
        assert_same(got, reference_match(matcher, one_layer, targets))
        assert_same(matcher(one_layer, targets), got)  # one layer alone: the same


@pytest.mark.parametrize("focal", [True, False])
def test_padded_costs_equal_the_reference_blocks(focal):
    outputs, targets = problem([4, 0, 9, 1], 40, focal, seed=3)
    matcher = HungarianMatcher(focal=focal)
    padded, everything, start = matcher.cost_matrix(outputs, targets), reference_cost(matcher, outputs, targets), 0
    for image, target in enumerate(targets):
        size = len(target["boxes"])
        want, got = everything[image, :, start:start + size], padded[image, :, :size]
        start += size
        if focal:  # a sigmoid's last bit may depend on the tensor's layout on CPU
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got, want)


def test_many_random_batches_match_the_reference():
    for seed in range(20):
        gen = torch.Generator().manual_seed(100 + seed)
        sizes = torch.randint(0, 21, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        outputs, targets = problem(sizes, 60, focal=seed % 2 == 0, seed=seed)
        matcher = HungarianMatcher(focal=seed % 2 == 0)
        assert_same(matcher(outputs, targets), reference_match(matcher, outputs, targets))


def test_images_without_boxes_skip_the_solver(monkeypatch):
    calls = []
    monkeypatch.setattr(assignment, "linear_sum_assignment",
                        lambda cost: calls.append(cost.shape) or linear_sum_assignment(cost))
    outputs, targets = problem([0, 3, 0], 6, focal=True, layers=2)
    indices = HungarianMatcher().match_layers([outputs, *outputs["aux_outputs"]], targets)
    assert calls == [(6, 3), (6, 3)]
    assert [len(p) for p, _ in indices[0]] == [0, 3, 0]


def test_nonfinite_costs_counted_for_the_image_own_targets_only():
    outputs, targets = problem([2, 3], 4, focal=True)
    outputs["pred_boxes"][0, 0] = float("nan")
    matcher = HungarianMatcher()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        (pred_idx, _), _ = matcher(outputs, targets)
    assert matcher.num_nonfinite_costs == 2  # query 0 of image 0 against its 2 targets
    assert 0 not in pred_idx.tolist()


def test_layers_of_another_shape_are_refused():
    outputs, targets = problem([2], 6, focal=True)
    other, _ = problem([2], 7, focal=True)
    with pytest.raises(ValueError, match="layer 1 has pred_logits"):
        HungarianMatcher().match_layers([outputs, other], targets)


def test_pool_solves_like_the_calling_thread():
    gen = torch.Generator().manual_seed(0)
    sizes = [60, 3, 0, 55]  # two problems of 300 x >= 50 go to the pool
    cost = torch.rand(len(sizes), 300, max(sizes), generator=gen)
    assert_same(solve_padded(cost, sizes, pool=True), solve_padded(cost, sizes))
    with pytest.raises(ValueError, match="CPU costs"):
        solve_padded(cost[0], sizes)


def test_indices_move_in_one_copy():
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.int64),) * 2]
    assert indices_to(indices, torch.device("cpu")) is indices
    moved = indices_to(indices, torch.device("meta"))
    assert [(p.device.type, len(p), len(t)) for p, t in moved] == [("meta", 2, 2), ("meta", 0, 0)]


def criterion_pair(focal: bool, dino: bool = False) -> tuple[SetCriterion, SetCriterion]:
    kind = DinoCriterion if dino else SetCriterion
    return (kind(NUM_CLASSES, HungarianMatcher(focal=focal), focal=focal),
            kind(NUM_CLASSES, ReferenceMatcher(focal=focal), focal=focal))


@pytest.mark.parametrize("focal", [True, False])
def test_criterion_losses_equal_the_reference_path_with_one_matcher_call(focal, monkeypatch):
    outputs, targets = problem([3, 0, 6], 20, focal, layers=4, seed=7)
    gen = torch.Generator().manual_seed(1)
    outputs["enc_outputs"] = layer(3, 20, True, gen) if focal else None  # two-stage: focal heads
    new, old = criterion_pair(focal)
    calls = []
    original = HungarianMatcher.match_layers
    monkeypatch.setattr(HungarianMatcher, "match_layers",
                        lambda self, layers, targets: calls.append(len(layers)) or original(self, layers, targets))
    got = new(outputs, targets)
    assert calls[0] == 4  # the last and the three auxiliary layers at once
    want = old(outputs, targets)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_dino_query_groups_equal_the_reference_path():
    outputs, targets = problem([2, 5, 0], 24, True, layers=3, seed=9)  # 3 groups of 8 queries
    outputs["query_groups"] = 3
    outputs["enc_outputs"] = layer(3, 8, True, torch.Generator().manual_seed(2))
    new, old = criterion_pair(True, dino=True)
    got, want = new(outputs, targets), old(outputs, targets)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
