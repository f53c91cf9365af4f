"""COCO box (and mask) AP with pycocotools against the original ground-truth annotation file.

Usage (every rank updates with its own images; rank 0 summarises)::

    evaluator = CocoEvaluator("annotations/val.json", label_to_category_id=[1, 2, 3])
    for batch in loader:
        detections = postprocess_detections(model(...), orig_sizes, focal=True)
        evaluator.update([t["image_id"] for t in batch["targets"]], detections)
    if evaluator.gather():          # True on the rank that holds every result
        metrics = evaluator.summarize()   # {"AP": ..., "AP50": ..., ..., "ARl": ...}
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from pipeline.boxes import box_xyxy_to_xywh

# The 12 numbers of COCOeval.summarize(), in its order. -1 means "no ground truth in that range".
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                     "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def load_coco(annotation_file: str | Path | dict) -> COCO:
    """pycocotools COCO from a json path or an already-loaded dataset dict, without its prints."""
    coco = COCO()
    if isinstance(annotation_file, dict):
        coco.dataset = copy.deepcopy(annotation_file)
    else:
        path = Path(annotation_file)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file {path} does not exist; pass the "
                                    "ground-truth json of the evaluation split")
        coco.dataset = json.loads(path.read_text())
    for key in ("images", "annotations", "categories"):
        if key not in coco.dataset:
            raise ValueError(f"COCO annotations from {annotation_file if not isinstance(annotation_file, dict) else 'dict'} "
                             f"lack the '{key}' list")
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def empty_results(gt: COCO) -> COCO:
    """A results COCO with no detections (``loadRes`` raises on an empty list): AP is then 0."""
    res = COCO()
    res.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                   "categories": copy.deepcopy(gt.dataset["categories"])}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def encode_masks(masks: Tensor) -> list[dict]:
    """(k, H, W) bool masks -> k COCO RLEs with json-friendly (str) counts."""
    if len(masks) == 0:
        return []
    # pycocotools wants (H, W, k) uint8 in Fortran order
    array = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


class CocoEvaluator:
    """Collects detections as COCO result records and evaluates them with COCOeval."""

    def __init__(self, annotation_file: str | Path | dict,
                 label_to_category_id: Mapping[int, int] | Sequence[int], iou_type: str = "bbox") -> None:
        """``label_to_category_id[label]`` is the json category id of the model's class ``label``."""
        if iou_type not in IOU_TYPES:
            raise ValueError(f"CocoEvaluator: iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        self.gt = load_coco(annotation_file)
        self.iou_type = iou_type
        self.label_to_category_id = (dict(label_to_category_id) if isinstance(label_to_category_id, Mapping)
                                     else dict(enumerate(label_to_category_id)))
        unknown = set(self.label_to_category_id.values()) - set(self.gt.getCatIds())
        if unknown:
            raise ValueError(f"CocoEvaluator: category ids {sorted(unknown)} of label_to_category_id "
                             f"are not in the annotation file (it has {sorted(self.gt.getCatIds())})")
        self.known_image_ids = set(self.gt.getImgIds())
        # Records grouped by image, so that images seen twice (padded distributed samplers) count once.
        self.records_by_image: dict[int, list[dict]] = {}
        self.num_nonfinite_detections = 0

    def finite_detections(self, detection: dict[str, Tensor]) -> dict[str, Tensor]:
        """The detections whose box and score are finite; the others are counted and warned about
        (a diverging model must not write NaN into the results json)."""
        finite = torch.isfinite(detection["boxes"]).all(-1) & torch.isfinite(detection["scores"])
        num_bad = int((~finite).sum())
        if num_bad == 0:
            return detection
        self.num_nonfinite_detections += num_bad
        warnings.warn(f"CocoEvaluator: dropped {num_bad} detections with NaN/inf boxes or scores",
                      RuntimeWarning, stacklevel=3)
        return {key: value[finite.to(value.device)] for key, value in detection.items()}

    def image_records(self, image_id: int, detection: dict[str, Tensor]) -> list[dict]:
        """COCO result records (image_id, category_id, bbox xywh, score[, segmentation]) of one image."""
        detection = self.finite_detections(detection)
        labels = detection["labels"].tolist()
        missing = sorted({lab for lab in labels if lab not in self.label_to_category_id})
        if missing:
            raise ValueError(f"CocoEvaluator: labels {missing} have no category id in "
                             f"label_to_category_id ({len(self.label_to_category_id)} labels); the "
                             "model's num_classes must match the dataset's categories")
        boxes = box_xyxy_to_xywh(detection["boxes"].detach().float().cpu()).tolist()
        scores = detection["scores"].detach().float().cpu().tolist()
        records = [{"image_id": image_id, "category_id": self.label_to_category_id[lab],
                    "bbox": box, "score": score} for lab, box, score in zip(labels, boxes, scores)]
        if self.iou_type == "segm":
            if "masks" not in detection:
                raise ValueError("CocoEvaluator(iou_type='segm'): detections need 'masks' (k, H, W) bool")
            for record, rle in zip(records, encode_masks(detection["masks"])):
                # Without "bbox", loadRes takes the detection's area from the mask (as for the
                # ground truth), which decides its small / medium / large range.
                del record["bbox"]
                record["segmentation"] = rle
        return records

    def update(self, image_ids: Sequence[int] | Tensor, detections: Sequence[dict[str, Tensor]]) -> None:
        """Add the detections of a batch: ``detections[i]`` (as from postprocess_detections, boxes
        absolute xyxy in the original image) belongs to ``image_ids[i]``."""
        ids = [int(i) for i in (image_ids.tolist() if isinstance(image_ids, Tensor) else image_ids)]
        if len(ids) != len(detections):
            raise ValueError(f"CocoEvaluator.update: {len(ids)} image ids for {len(detections)} detections")
        for image_id, detection in zip(ids, detections):
            if image_id not in self.known_image_ids:
                raise ValueError(f"CocoEvaluator.update: image id {image_id} is not in the annotation "
                                 "file; evaluate against the json the data was read from")
            if image_id not in self.records_by_image:
                self.records_by_image[image_id] = self.image_records(image_id, detection)

    @property
    def records(self) -> list[dict]:
        """Every COCO result record collected so far, image by image."""
        return [rec for image_id in sorted(self.records_by_image) for rec in self.records_by_image[image_id]]

    def results_json(self, path: str | Path) -> Path:
        """Write the result records as a COCO results json; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.records))
        return path

    def gather(self, dst: int = 0) -> bool:
        """Collect every rank's records on rank ``dst`` (a collective: call it on every rank).

        Returns True on the rank that now holds all records (always True when not distributed).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return True
        rank = dist.get_rank()
        received = [None] * dist.get_world_size() if rank == dst else None
        dist.gather_object(self.records_by_image, received, dst=dst)
        if rank != dst:
            return False
        merged: dict[int, list[dict]] = {}
        for part in received:
            for image_id, recs in part.items():
                merged.setdefault(image_id, recs)
        self.records_by_image = merged
        return True

    def evaluate(self) -> COCOeval:
        """Run COCOeval over the images seen so far (all GT images when none were seen)."""
        records = copy.deepcopy(self.records)  # loadRes adds fields to the records it gets
        with contextlib.redirect_stdout(io.StringIO()):
            results = self.gt.loadRes(records) if records else empty_results(self.gt)
            coco_eval = COCOeval(self.gt, results, iouType=self.iou_type)
            if self.records_by_image:
                coco_eval.params.imgIds = sorted(self.records_by_image)
            coco_eval.evaluate()
            coco_eval.accumulate()
        return coco_eval

    def summarize(self) -> dict[str, float]:
        """The 12 COCO numbers by name (COCO_METRIC_NAMES); AP 0 when there are no detections.

        The printed COCO table is kept in ``self.summary_text``.
        """
        if not self.records:
            warnings.warn("CocoEvaluator.summarize: no detections were collected; AP is 0",
                          RuntimeWarning, stacklevel=2)
        coco_eval = self.evaluate()
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            coco_eval.summarize()
        self.summary_text = text.getvalue()
        return {name: float(value) for name, value in zip(COCO_METRIC_NAMES, coco_eval.stats)}
