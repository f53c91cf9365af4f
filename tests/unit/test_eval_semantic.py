"""mIoU and pixel accuracy on hand-built label maps."""

import numpy as np
import pytest
import torch

from pipeline.eval.semantic import SemanticEvaluator, panoptic_to_semantic


def test_miou_of_a_hand_computed_case():
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])
    evaluator = SemanticEvaluator(num_classes=3)
    evaluator.update(pred, gt)
    # class 0: TP 4, FP 1 -> 4/5; class 1: TP 3, FN 1 -> 3/4; class 2 absent everywhere: left out
    metrics = evaluator.summarize()
    assert metrics["mIoU"] == pytest.approx(100 * (4 / 5 + 3 / 4) / 2)
    assert metrics["pixel_acc"] == pytest.approx(100 * 7 / 8)
    assert torch.isnan(evaluator.iou_per_class()[2])


def test_ignored_pixels_do_not_count():
    gt = torch.tensor([[0, 255], [1, 255]])
    pred = torch.tensor([[0, 1], [1, 0]])
    evaluator = SemanticEvaluator(num_classes=2)
    evaluator.update(pred, gt)
    assert evaluator.summarize() == {"mIoU": pytest.approx(100.0), "pixel_acc": pytest.approx(100.0)}


def test_a_predicted_class_absent_from_ground_truth_scores_zero():
    evaluator = SemanticEvaluator(num_classes=2)
    evaluator.update(torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert evaluator.summarize()["mIoU"] == 0.0
    assert evaluator.iou_per_class().tolist() == [0.0, 0.0]


def test_batches_accumulate():
    evaluator = SemanticEvaluator(num_classes=2)
    evaluator.update(torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 3, 3, dtype=torch.long))
    evaluator.update(torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 3, dtype=torch.long))
    # class 0: TP 18, FP 9 -> 2/3; class 1: TP 0, FN 9 -> 0
    assert evaluator.summarize()["mIoU"] == pytest.approx(100 * (2 / 3) / 2)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="ignore_index"):
        SemanticEvaluator(num_classes=3, ignore_index=1)
    evaluator = SemanticEvaluator(num_classes=2)
    with pytest.raises(ValueError, match="ground-truth labels"):
        evaluator.update(torch.zeros(2, 2), torch.full((2, 2), 5))
    with pytest.raises(ValueError, match="differ in shape"):
        evaluator.update(torch.zeros(2, 2), torch.zeros(3, 3))


def test_panoptic_to_semantic_maps_categories_and_void():
    ids = np.array([[0, 1], [2, 3]])
    segments = [{"id": 1, "category_id": 10}, {"id": 2, "category_id": 20, "iscrowd": 1},
                {"id": 3, "category_id": 30}]
    semantic = panoptic_to_semantic(ids, segments, {10: 0, 30: 1})
    assert semantic.tolist() == [[255, 0], [255, 1]]
