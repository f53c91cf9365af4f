"""COCO evaluation, detection post-processing and top-k accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.eval import (
    COCO_METRIC_NAMES,
    CocoEvaluator,
    TopKAccuracy,
    postprocess_detections,
    postprocess_masks,
    topk_accuracy,
)
from pipeline.eval.coco import encode_masks

# Two images; category ids 3 and 7 (not contiguous) map to the model's labels 0 and 1.
IMAGES = [{"id": 11, "width": 200, "height": 100}, {"id": 12, "width": 120, "height": 160}]
GT_BOXES = {  # image id -> [(category id, COCO xywh)], small (<32^2), medium and large objects
    11: [(3, [10.0, 10.0, 20.0, 15.0]), (7, [60.0, 20.0, 50.0, 40.0])],
    12: [(3, [5.0, 30.0, 100.0, 120.0]), (7, [70.0, 5.0, 30.0, 25.0])],
}
LABELS = [3, 7]


def write_gt(tmp_path):
    objects = [(image_id, cat, box) for image_id, objs in GT_BOXES.items() for cat, box in objs]
    annotations = [{"id": i + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                    "area": box[2] * box[3], "iscrowd": 0} for i, (image_id, cat, box) in enumerate(objects)]
    data = {"images": IMAGES, "annotations": annotations,
            "categories": [{"id": 3, "name": "disc"}, {"id": 7, "name": "bar"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def detections_from_gt(shift: float = 0.0, score: float = 0.9):
    """Detections equal to the ground truth (moved right by ``shift`` pixels), in update format."""
    out = []
    for objs in GT_BOXES.values():
        boxes = torch.tensor([[x + shift, y, x + shift + w, y + h] for _, (x, y, w, h) in objs])
        out.append({"scores": torch.full((len(objs),), score),
                    "labels": torch.tensor([LABELS.index(cat) for cat, _ in objs]), "boxes": boxes})
    return out


def test_perfect_detections_give_ap_one_and_all_twelve_keys(tmp_path):
    evaluator = CocoEvaluator(write_gt(tmp_path), LABELS)
    evaluator.update(list(GT_BOXES), detections_from_gt())
    metrics = evaluator.summarize()
    assert list(metrics) == list(COCO_METRIC_NAMES) and len(metrics) == 12
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR100"):
        assert metrics[key] == pytest.approx(1.0), key
    assert "Average Precision" in evaluator.summary_text


def test_shifted_detections_score_lower(tmp_path):
    evaluator = CocoEvaluator(write_gt(tmp_path), {0: 3, 1: 7})
    evaluator.update(torch.tensor(list(GT_BOXES)), detections_from_gt(shift=6.0))
    metrics = evaluator.summarize()
    assert 0.0 < metrics["AP"] < 1.0 and metrics["APs"] < metrics["APl"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_empty_results_give_zero_ap(tmp_path):
    evaluator = CocoEvaluator(write_gt(tmp_path), LABELS)
    assert evaluator.summarize()["AP"] == 0.0  # nothing updated at all
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator.update([11, 12], [empty, empty])
    metrics = evaluator.summarize()
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0


def test_image_without_detections_among_others_counts_its_misses(tmp_path):
    detections = detections_from_gt()
    detections[1] = {k: v[:0] for k, v in detections[1].items()}
    evaluator = CocoEvaluator(write_gt(tmp_path), LABELS)
    evaluator.update(list(GT_BOXES), detections)
    assert evaluator.summarize()["AR100"] == pytest.approx(0.5)  # half the objects of each class found


def test_results_json_and_duplicate_images(tmp_path):
    evaluator = CocoEvaluator(write_gt(tmp_path), LABELS)
    evaluator.update(list(GT_BOXES), detections_from_gt())
    evaluator.update([11], detections_from_gt(shift=50.0)[:1])  # a padded sampler repeats image 11
    records = json.loads(evaluator.results_json(tmp_path / "out" / "results.json").read_text())
    assert len(records) == 4
    first = next(r for r in records if r["image_id"] == 11 and r["category_id"] == 7)
    assert first["bbox"] == pytest.approx([60.0, 20.0, 50.0, 40.0]) and first["score"] == pytest.approx(0.9)


def test_bad_inputs_raise_clear_errors(tmp_path):
    gt = write_gt(tmp_path)
    with pytest.raises(ValueError, match="not in the annotation file"):
        CocoEvaluator(gt, [3, 5])
    evaluator = CocoEvaluator(gt, LABELS)
    with pytest.raises(ValueError, match="image id 99"):
        evaluator.update([99], detections_from_gt()[:1])
    bad = detections_from_gt()[:1]
    bad[0]["labels"] = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"labels \[2\] have no category id"):
        evaluator.update([11], bad)
    with pytest.raises(FileNotFoundError):
        CocoEvaluator(tmp_path / "missing.json", LABELS)


def test_gather_without_distributed_keeps_everything(tmp_path):
    evaluator = CocoEvaluator(write_gt(tmp_path), LABELS)
    evaluator.update(list(GT_BOXES), detections_from_gt())
    assert evaluator.gather() is True and len(evaluator.records) == 4


def test_postprocess_focal_top_k_and_absolute_boxes():
    logits = torch.full((2, 3, 4), -5.0)
    logits[0, 2, 1] = 3.0  # best pair of image 0: query 2, class 1
    logits[1, 0, 3] = 2.0
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2, 3, 1)
    boxes[0, 2] = torch.tensor([0.25, 0.5, 0.5, 0.2])
    sizes = torch.tensor([[100, 200], [50, 80]])  # (h, w)
    results = postprocess_detections({"pred_logits": logits, "pred_boxes": boxes}, sizes, focal=True, top_k=5)
    assert [r["scores"].shape for r in results] == [(5,), (5,)]
    assert results[0]["labels"][0] == 1 and results[0]["scores"][0] == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert results[0]["boxes"][0].tolist() == pytest.approx([0.0, 40.0, 100.0, 60.0])  # x by w, y by h
    assert results[1]["labels"][0] == 3 and results[1]["boxes"][0].tolist() == pytest.approx([32.0, 15.0, 48.0, 35.0])
    assert all(bool((r["scores"][:-1] >= r["scores"][1:]).all()) for r in results)
    many = postprocess_detections({"pred_logits": logits, "pred_boxes": boxes}, sizes, focal=True)
    assert many[0]["scores"].shape == (12,)  # top_k=100 capped at Q * C


def test_postprocess_softmax_ignores_no_object():
    logits = torch.tensor([[[0.0, 1.0, 9.0], [2.0, 0.0, 0.0], [0.0, 0.5, 0.0]]])  # last = no-object
    boxes = torch.rand(1, 3, 4)
    (result,) = postprocess_detections({"pred_logits": logits, "pred_boxes": boxes},
                                       torch.tensor([[10, 10]]), focal=False, top_k=2)
    assert result["labels"].tolist() == [0, 1]  # queries 1 and 2; no label 2 (no-object)
    assert result["scores"][0] == pytest.approx(logits[0, 1].softmax(-1)[0].item())
    with pytest.raises(ValueError, match="target_sizes"):
        postprocess_detections({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([10, 10]), focal=False)


def test_postprocess_then_coco_on_exact_boxes_gives_ap_one(tmp_path):
    logits = torch.full((2, 4, 2), -6.0)
    boxes = torch.full((2, 4, 4), 0.5)
    for b, (image, objs) in enumerate(zip(IMAGES, GT_BOXES.values())):
        for q, (cat, (x, y, w, h)) in enumerate(objs):
            logits[b, q, LABELS.index(cat)] = 4.0
            boxes[b, q] = torch.tensor([(x + w / 2) / image["width"], (y + h / 2) / image["height"],
                                        w / image["width"], h / image["height"]])
    sizes = torch.tensor([[image["height"], image["width"]] for image in IMAGES])
    detections = postprocess_detections({"pred_logits": logits, "pred_boxes": boxes}, sizes, focal=True)
    evaluator = CocoEvaluator(write_gt(tmp_path), LABELS)
    evaluator.update([image["id"] for image in IMAGES], detections)
    assert evaluator.summarize()["AP"] == pytest.approx(1.0)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    labels = torch.tensor([1, 1, 0])  # top-1 hit; rank 6 (miss in top-5); rank 6 (miss)
    assert topk_accuracy(logits, labels) == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(1 / 3)}
    labels = torch.tensor([1, 2, 5])
    assert topk_accuracy(logits, labels) == {"top1": pytest.approx(2 / 3), "top5": pytest.approx(1.0)}
    meter = TopKAccuracy(ks=(1, 5))
    meter.update(logits[:2], labels[:2])
    meter.update(logits[2:], labels[2:])
    assert meter.compute() == {"top1": pytest.approx(2 / 3), "top5": pytest.approx(1.0)}
    assert topk_accuracy(logits[:, :3], labels.clamp(max=2), ks=(1, 5))["top5"] == 1.0  # k capped at K


def _gather_worker(rank: int, rendezvous: str, gt_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        evaluator = CocoEvaluator(gt_path, LABELS)
        # rank 0 sees image 11; rank 1 image 12 and (padding) image 11 again, shifted: ignored
        ids = [11] if rank == 0 else [12, 11]
        dets = detections_from_gt()
        evaluator.update(ids, [dets[0]] if rank == 0 else [dets[1], detections_from_gt(shift=40.0)[0]])
        meter = TopKAccuracy(ks=(1,))
        meter.update(torch.eye(3)[: rank + 1], torch.tensor([0, 0][: rank + 1]))  # 1 of 1, 1 of 2
        result = {"holds_all": evaluator.gather(), "top1": meter.compute()["top1"]}
        if result["holds_all"]:
            result["AP"], result["num_records"] = evaluator.summarize()["AP"], len(evaluator.records)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_gather_collects_every_rank_on_rank_zero(tmp_path):
    import torch.multiprocessing as mp

    gt = write_gt(tmp_path)
    mp.spawn(_gather_worker, args=(str(tmp_path / "rdzv"), str(gt), str(tmp_path)), nprocs=2)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["holds_all"] and not second["holds_all"]
    assert first["num_records"] == 4 and first["AP"] == pytest.approx(1.0)  # duplicate counted once
    assert first["top1"] == second["top1"] == pytest.approx(2 / 3)


def rectangle_masks(image: dict, boxes: list[list[float]], shift: int = 0) -> torch.Tensor:
    masks = torch.zeros(len(boxes), image["height"], image["width"], dtype=torch.bool)
    for mask, (x, y, w, h) in zip(masks, boxes):
        mask[int(y):int(y + h), int(x) + shift:int(x + w) + shift] = True
    return masks


def segm_gt() -> dict:
    annotations = []
    for image in IMAGES:
        objs = GT_BOXES[image["id"]]
        for (cat, box), rle in zip(objs, encode_masks(rectangle_masks(image, [b for _, b in objs]))):
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": cat,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0, "segmentation": rle})
    return {"images": IMAGES, "annotations": annotations, "categories": [{"id": 3}, {"id": 7}]}


@pytest.mark.parametrize("shift, perfect", [(0, True), (4, False)])
def test_segm_evaluation_of_rle_masks(shift, perfect):
    evaluator = CocoEvaluator(segm_gt(), LABELS, iou_type="segm")  # an in-memory dataset dict
    detections = detections_from_gt()
    for image, detection in zip(IMAGES, detections):
        detection["masks"] = rectangle_masks(image, [b for _, b in GT_BOXES[image["id"]]], shift)
    evaluator.update([image["id"] for image in IMAGES], detections)
    assert "bbox" not in evaluator.records[0]  # so that the detection's area is its mask's
    ap = evaluator.summarize()["AP"]
    assert ap == pytest.approx(1.0) if perfect else 0.0 < ap < 1.0


def test_postprocess_masks_crop_padding_and_resize():
    logits = torch.zeros(1, 2, 1)
    logits[0, 1, 0] = 5.0
    pred_masks = torch.full((1, 2, 8, 12), -10.0)  # canvas 16 x 24 at stride 2
    pred_masks[0, 1, 1:3, 2:6] = 10.0  # canvas rows 2-5, columns 4-11
    detections = postprocess_detections({"pred_logits": logits, "pred_boxes": torch.rand(1, 2, 4)},
                                        torch.tensor([[20, 32]]), focal=True, top_k=1)
    assert detections[0]["queries"].tolist() == [1]
    # the image fills 10 x 16 of the 16 x 24 canvas; the original image is twice as large
    (result,) = postprocess_masks(pred_masks, detections, torch.tensor([[10, 16]]), torch.tensor([[20, 32]]), (16, 24))
    mask = result["masks"][0]
    assert mask.shape == (20, 32) and mask.dtype == torch.bool
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    assert (rows.min().item(), rows.max().item()) == (4, 11)  # canvas rows 2-5 -> 4-11
    assert (cols.min().item(), cols.max().item()) == (8, 23)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine each parallel
    region (binary_cross_entropy_with_logits opens one) waits for a descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("focal", [True, False])
def test_free_predictions_trained_with_the_criterion_reach_ap_one(tmp_path, focal, one_thread):
    """Losses, matcher, post-processing and COCO together: gradient descent on free (B, Q, ...)
    predictions must fit the two images' boxes and classes."""
    from pipeline.losses import HungarianMatcher, LossWeights, SetCriterion

    torch.manual_seed(0)
    targets = []
    for image in IMAGES:
        objs = GT_BOXES[image["id"]]
        boxes = torch.tensor([[(x + w / 2) / image["width"], (y + h / 2) / image["height"],
                               w / image["width"], h / image["height"]] for _, (x, y, w, h) in objs])
        targets.append({"labels": torch.tensor([LABELS.index(c) for c, _ in objs]), "boxes": boxes})
    logits = torch.zeros(2, 5, 2 if focal else 3, requires_grad=True)
    box_logits = torch.zeros(2, 5, 4).uniform_(-1, 1).requires_grad_()
    criterion = SetCriterion(2, HungarianMatcher(focal=focal, cost_class=2.0 if focal else 1.0), focal=focal)
    weights = LossWeights.deformable_detr() if focal else LossWeights.detr()
    optimizer = torch.optim.Adam([logits, box_logits], lr=0.1)
    for _ in range(80):
        outputs = {"pred_logits": logits, "pred_boxes": box_logits.sigmoid()}
        loss = SetCriterion.weighted_total(criterion(outputs, targets), weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sizes = torch.tensor([[image["height"], image["width"]] for image in IMAGES])
    evaluator = CocoEvaluator(write_gt(tmp_path), LABELS)
    evaluator.update([image["id"] for image in IMAGES], postprocess_detections(outputs, sizes, focal=focal))
    assert evaluator.summarize()["AP"] > 0.95


def test_nonfinite_detections_are_dropped_and_counted(tmp_path):
    detections = detections_from_gt()
    detections[0]["boxes"][1, 2] = float("nan")
    detections[1]["scores"][0] = float("inf")
    evaluator = CocoEvaluator(write_gt(tmp_path), LABELS)
    with pytest.warns(RuntimeWarning, match="dropped 1 detections"):
        evaluator.update(list(GT_BOXES), detections)
    assert evaluator.num_nonfinite_detections == 2 and len(evaluator.records) == 2
    text = evaluator.results_json(tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and len(json.loads(text)) == 2
    assert 0.0 < evaluator.summarize()["AP"] < 1.0
