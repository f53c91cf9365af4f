"""HungarianMatcher: optimality, batched == per image, permutation invariance, robustness."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from pipeline.losses import HungarianMatcher, MatcherConfig


def random_batch(sizes: list[int], num_queries: int = 6, num_logits: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(len(sizes), num_queries, num_logits, generator=gen),
               "pred_boxes": torch.rand(len(sizes), num_queries, 4, generator=gen) * 0.5 + 0.1}
    num_labels = num_logits - 1  # valid for both heads (softmax has no-object last)
    targets = [{"labels": torch.randint(0, num_labels, (n,), generator=gen),
                "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.1} for n in sizes]
    return outputs, targets


def hand_cost(logits, boxes, labels, tboxes, focal, weights=(2.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    """(Q, n) matching cost written element by element with math, independent of the library."""
    def xyxy(b):
        return (b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2)

    def giou(a, b):
        a, b = xyxy(a), xyxy(b)
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
        return inter / union - (hull - union) / hull

    cost = torch.zeros(len(logits), len(labels), dtype=torch.float64)
    for q, t in itertools.product(range(len(logits)), range(len(labels))):
        row, label = logits[q].tolist(), int(labels[t])
        if focal:
            p = 1 / (1 + math.exp(-row[label]))
            cls = alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
        else:
            cls = -math.exp(row[label]) / sum(math.exp(x) for x in row)
        l1 = sum(abs(a - b) for a, b in zip(boxes[q].tolist(), tboxes[t].tolist()))
        cost[q, t] = weights[0] * cls + weights[1] * l1 - weights[2] * giou(boxes[q].tolist(), tboxes[t].tolist())
    return cost


@pytest.mark.parametrize("focal", [True, False])
def test_assignment_is_optimal_against_brute_force(focal):
    outputs, targets = random_batch([3], num_queries=5, seed=1)
    (pred_idx, tgt_idx), = HungarianMatcher(focal=focal)(outputs, targets)
    cost = hand_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"],
                     targets[0]["boxes"], focal)
    best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert float(cost[pred_idx, tgt_idx].sum()) == pytest.approx(float(best), abs=1e-5)
    assert sorted(tgt_idx.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("focal", [True, False])
def test_batched_equals_per_image(focal):
    outputs, targets = random_batch([2, 0, 5, 1], seed=2)
    matcher = HungarianMatcher(focal=focal)
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        single = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])


def test_permuting_targets_permutes_the_assignment():
    outputs, targets = random_batch([5], seed=3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = [{"labels": targets[0]["labels"][perm], "boxes": targets[0]["boxes"][perm]}]
    matcher = HungarianMatcher()
    (p0, t0), = matcher(outputs, targets)
    (p1, t1), = matcher(outputs, permuted)
    assert set(zip(p0.tolist(), t0.tolist())) == {(q, int(perm[j])) for q, j in zip(p1.tolist(), t1.tolist())}


def test_exact_boxes_are_matched_to_their_queries():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]])
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": boxes}
    targets = [{"labels": torch.tensor([1, 0]), "boxes": boxes[0, [2, 0]]}]
    (pred_idx, tgt_idx), = HungarianMatcher()(outputs, targets)
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {0: 2, 1: 0}


def test_result_lengths_are_min_of_queries_and_targets_and_int64():
    outputs, targets = random_batch([9, 3], num_queries=4, seed=4)
    indices = HungarianMatcher()(outputs, targets)
    assert [len(p) for p, _ in indices] == [4, 3] and [len(t) for _, t in indices] == [4, 3]
    assert all(p.dtype == torch.int64 and t.dtype == torch.int64 for p, t in indices)
    assert len(set(indices[0][1].tolist())) == 4  # one-to-one


@pytest.mark.parametrize("sizes", [[0, 0], [0, 2]])
def test_empty_targets(sizes):
    outputs, targets = random_batch(sizes, seed=5)
    indices = HungarianMatcher()(outputs, targets)
    assert [len(p) for p, _ in indices] == sizes
    assert indices[0][0].dtype == torch.int64


def test_nonfinite_costs_do_not_crash_and_are_counted():
    outputs, targets = random_batch([2], num_queries=4, seed=6)
    outputs["pred_boxes"][0, 0] = float("nan")
    outputs["pred_logits"][0, 1] = float("inf")
    outputs["pred_boxes"][0, 1, 2] = float("inf")
    matcher = HungarianMatcher()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        (pred_idx, _), = matcher(outputs, targets)
    assert matcher.num_nonfinite_costs == 4  # two queries x two targets
    assert sorted(pred_idx.tolist()) == [2, 3]  # the finite queries are preferred


def test_all_nan_costs_still_give_a_full_assignment():
    outputs, targets = random_batch([3], num_queries=4, seed=7)
    outputs["pred_logits"][:] = float("nan")
    with pytest.warns(RuntimeWarning):
        (pred_idx, tgt_idx), = HungarianMatcher()(outputs, targets)
    assert len(pred_idx) == 3 and sorted(tgt_idx.tolist()) == [0, 1, 2]


def test_bf16_inputs_match_like_their_fp32_values():
    outputs, targets = random_batch([4, 2], seed=8)
    bf16 = {k: v.bfloat16() for k, v in outputs.items()}
    upcast = {k: v.float() for k, v in bf16.items()}
    matcher = HungarianMatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for (a, b), (c, d) in zip(matcher(bf16, targets), matcher(upcast, targets)):
            assert torch.equal(a, c) and torch.equal(b, d)


def test_bad_inputs_raise_clear_errors():
    outputs, targets = random_batch([2], num_logits=3, seed=9)
    targets[0]["labels"][0] = 3  # a focal head with 3 classes has labels 0..2
    with pytest.raises(ValueError, match="labels must lie in"):
        HungarianMatcher(focal=True)(outputs, targets)
    targets[0]["labels"][0] = 2  # softmax: 3 logits = 2 classes + no-object
    with pytest.raises(ValueError, match="labels must lie in"):
        HungarianMatcher(focal=False)(outputs, targets)
    with pytest.raises(ValueError, match="target dicts"):
        HungarianMatcher()(outputs, targets * 2)


def test_config_validation_and_build():
    with pytest.raises(ValueError, match="all 0"):
        MatcherConfig(cost_class=0, cost_bbox=0, cost_giou=0)
    with pytest.raises(ValueError, match="focal_alpha"):
        HungarianMatcher(focal_alpha=1.5)
    matcher = HungarianMatcher.from_config(MatcherConfig(cost_class=1.0, cost_mask=3.0), focal=False)
    assert matcher.cost_class == 1.0 and matcher.cost_mask == 3.0 and not matcher.focal
    assert matcher.focal_alpha == 0.25 and matcher.focal_gamma == 2.0
    with pytest.raises(TypeError):
        MatcherConfig(focal=False)  # the head type is the model's: DetectorConfig.focal
