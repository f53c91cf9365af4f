"""Evaluation: detection post-processing, COCO AP (pycocotools) and top-k accuracy."""

from pipeline.eval.coco import COCO_METRIC_NAMES, CocoEvaluator
from pipeline.eval.postprocess import postprocess_detections, postprocess_masks
from pipeline.eval.topk import TopKAccuracy, topk_accuracy, topk_correct

__all__ = [
    "COCO_METRIC_NAMES",
    "CocoEvaluator",
    "TopKAccuracy",
    "postprocess_detections",
    "postprocess_masks",
    "topk_accuracy",
    "topk_correct",
]
