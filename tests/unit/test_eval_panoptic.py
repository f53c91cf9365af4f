"""PQ / SQ / RQ on hand-built panoptic maps with answers worked out by hand."""

import numpy as np
import pytest

from pipeline.eval.panoptic import PanopticEvaluator, rgb_to_id

CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 5, "isthing": 0}]


def segs(*pairs, crowd=()):
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in pairs]


def test_perfect_prediction_scores_100():
    gt = np.array([[1, 1, 3, 3], [1, 1, 3, 3], [0, 0, 3, 3], [2, 2, 3, 3]])
    evaluator = PanopticEvaluator(CATEGORIES)
    # different ids on the prediction side: matching goes by overlap, not by id
    evaluator.update(gt, segs((1, 1), (2, 2), (3, 5)), gt * 10, segs((10, 1), (20, 2), (30, 5)))
    metrics = evaluator.summarize()
    assert metrics["PQ"] == pytest.approx(100.0)
    assert metrics["PQ_th"] == pytest.approx(100.0) and metrics["PQ_st"] == pytest.approx(100.0)


def test_partial_overlaps_give_the_hand_computed_pq():
    # gt: thing (cat 1) = left half (8 px), stuff (cat 5) = right half (8 px)
    gt = np.array([[1, 1, 2, 2]] * 4)
    # pred: thing = left half + third column (12 px) -> IoU 8/12 (match);
    # stuff = last column only (4 px) -> IoU 4/8 = 0.5, not > 0.5: one FP and one FN
    pred = np.array([[1, 1, 1, 2]] * 4)
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(gt, segs((1, 1), (2, 5)), pred, segs((1, 1), (2, 5)))
    metrics = evaluator.summarize()
    assert metrics["PQ_th"] == pytest.approx(100 * 8 / 12)
    assert metrics["SQ_th"] == pytest.approx(100 * 8 / 12) and metrics["RQ_th"] == pytest.approx(100.0)
    assert metrics["PQ_st"] == pytest.approx(0.0) and metrics["RQ_st"] == pytest.approx(0.0)
    assert metrics["PQ"] == pytest.approx(100 * 8 / 12 / 2)  # category 2 never occurs: left out
    per_category = evaluator.per_category()
    assert set(per_category) == {1, 5}
    assert (per_category[5]["FP"], per_category[5]["FN"]) == (1, 1)


def test_wrong_category_is_one_fp_and_one_fn():
    gt = np.ones((4, 4), np.int64)
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(gt, segs((1, 1)), gt, segs((1, 2)))
    per_category = evaluator.per_category()
    assert per_category[1]["FN"] == 1 and per_category[2]["FP"] == 1
    assert evaluator.summarize()["PQ"] == 0.0


def test_predicted_pixels_on_void_leave_the_union():
    gt = np.array([[1, 1, 0, 0]] * 4)
    pred = np.ones((4, 4), np.int64)  # covers the thing and the void region
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(gt, segs((1, 1)), pred, segs((1, 1)))
    assert evaluator.summarize()["PQ"] == pytest.approx(100.0)


def test_unmatched_prediction_mostly_on_void_or_crowd_is_no_false_positive():
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [7, 7, 7, 7], [7, 7, 7, 7]])  # 7: crowd of cat 2
    gt_segments = segs((1, 1), (7, 2), crowd=(7,))
    # pred 2 lies on void (4 px) + thing 1 (0 px): ignored; pred 3 (cat 2) on the crowd: ignored
    pred = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 3, 3]])
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(gt, gt_segments, pred, segs((1, 1), (2, 1), (3, 2)))
    per_category = evaluator.per_category()
    assert per_category[1] == pytest.approx({"PQ": 1.0, "SQ": 1.0, "RQ": 1.0, "TP": 1, "FP": 0, "FN": 0})
    assert 2 not in per_category  # a crowd gt is no FN, and the prediction on it no FP


def test_prediction_on_crowd_of_another_category_is_a_false_positive():
    gt = np.full((4, 4), 7)
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(gt, segs((7, 2), crowd=(7,)), np.ones((4, 4), np.int64), segs((1, 1)))
    assert evaluator.per_category()[1]["FP"] == 1


def test_counts_accumulate_over_images():
    gt = np.ones((2, 2), np.int64)
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(gt, segs((1, 1)), gt, segs((1, 1)))  # TP
    evaluator.update(gt, segs((1, 1)), np.zeros((2, 2), np.int64), [])  # FN
    assert evaluator.summarize()["PQ"] == pytest.approx(100 * 1 / 1.5)


def test_bad_inputs_raise_clear_errors():
    evaluator = PanopticEvaluator(CATEGORIES)
    with pytest.raises(ValueError, match="differ in size"):
        evaluator.update(np.ones((2, 2)), segs((1, 1)), np.ones((3, 3)), segs((1, 1)))
    with pytest.raises(ValueError, match="without a segments_info"):
        evaluator.update(np.ones((2, 2)), segs((1, 1)), np.full((2, 2), 4), segs((1, 1)))
    with pytest.raises(ValueError, match="category 9"):
        evaluator.update(np.ones((2, 2)), segs((1, 1)), np.ones((2, 2)), segs((1, 9)))


def test_rgb_to_id_follows_the_coco_encoding():
    rgb = np.array([[[1, 2, 3]]], np.uint8)
    assert rgb_to_id(rgb)[0, 0] == 1 + 2 * 256 + 3 * 256 * 256
