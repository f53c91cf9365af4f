"""The panoptic view of a detection shard set: thing instances from the shards plus one mask per
stuff segment read from ``<annotations>/panoptic_<split>/<png>`` (stuff labels follow the thing
labels), so a segmenter learns things and stuff as Mask2Former does.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.data.collate import collate_detection
from pipeline.data.decoding import coco_target, decode_jpeg, decode_json
from pipeline.data.detection import DetectionDataConfig, build_detection_transform
from pipeline.data.errors import DataError
from pipeline.data.eval_stream import EvalLoader, build_split_loader
from pipeline.data.shards import load_shard_info
from pipeline.data.stream import TrainLoader
from pipeline.data.transforms import DetectionAugment, DetectionEval, to_model_inputs
from pipeline.eval.panoptic import load_panoptic_json, read_panoptic_png


@dataclass(frozen=True)
class PanopticView:
    """The panoptic annotations of one split: categories in label order (things of the shards
    first, then stuff), and per image id its PNG path and segments_info."""

    categories: tuple[dict, ...]
    images: dict  # image id -> (png path str, segments_info list)

    @property
    def label_of(self) -> dict[int, int]:
        return {int(c["id"]): label for label, c in enumerate(self.categories)}

    @property
    def is_thing(self) -> list[bool]:
        return [bool(c.get("isthing", 1)) for c in self.categories]


def load_panoptic_view(annotations_dir: Path, split: str, thing_categories: list[dict]) -> PanopticView:
    """Read ``panoptic_<split>.json``; things keep the shards' label order, stuff follows."""
    data = load_panoptic_json(Path(annotations_dir) / f"panoptic_{split}.json")
    thing_ids = {int(c["id"]) for c in thing_categories}
    stuff = [c for c in data["categories"] if not c.get("isthing", 1) and int(c["id"]) not in thing_ids]
    categories = tuple([{**c, "isthing": 1} for c in thing_categories] + [dict(c) for c in stuff])
    folder = Path(annotations_dir) / f"panoptic_{split}"
    images = {int(a["image_id"]): (str(folder / a["file_name"]), a["segments_info"]) for a in data["annotations"]}
    return PanopticView(categories, images)


def _stuff_annotations(view: PanopticView, image_id: int) -> list[dict]:
    """One COCO annotation (RLE) per stuff segment of the image's panoptic PNG."""
    if image_id not in view.images:
        return []
    png, segments = view.images[image_id]
    thing = dict(zip(view.label_of, view.is_thing))
    stuff = [s for s in segments if not thing.get(int(s["category_id"]), True)]
    if not stuff:
        return []
    ids = read_panoptic_png(png)
    annotations = []
    for segment in stuff:
        mask = ids == int(segment["id"])
        if not mask.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({"category_id": int(segment["category_id"]), "iscrowd": 0,
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": int(mask.sum()),
                            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}})
    return annotations


@dataclass(frozen=True)
class SegmentationDecoder:
    """Raw shard sample -> (image, target with masks of things and, with a view, stuff)."""

    label_of: dict[int, int]
    transform: DetectionAugment | DetectionEval
    view: PanopticView | None

    def __call__(self, raw: dict, rng: random.Random | None, dropped: Counter):
        key = raw.get("__key__", "?")
        record = decode_json(raw.get("json"), key)
        image = decode_jpeg(raw.get("jpg"), key)
        if self.view is not None:
            image_id = int(record["image"].get("id", -1))
            record = {**record, "annotations": record.get("annotations", []) + _stuff_annotations(self.view, image_id)}
        target = coco_target(record, image.size, self.label_of, True, dropped)
        image, target = self.transform(image, target, rng)
        return to_model_inputs(image, target)


def build_segmentation_loader(cfg: DetectionDataConfig, split: str, view: PanopticView | None,
                              rank: int = 0, world_size: int = 1, seed: int = 0) -> TrainLoader | EvalLoader:
    """Like ``build_detection_loader`` with masks always on and stuff segments from ``view``."""
    info = load_shard_info(Path(cfg.shards) / split)
    if info.kind != "detection":
        raise DataError(f"{info.root} holds {info.kind} shards; the segmentation stage needs detection shards")
    categories = list(view.categories) if view is not None else info.categories
    label_of = {int(c["id"]): label for label, c in enumerate(categories)}
    train = split in cfg.train_splits
    decode = SegmentationDecoder(label_of, build_detection_transform(cfg, train), view)
    collate = partial(collate_detection, size_divisibility=cfg.size_divisibility)
    return build_split_loader(cfg, info, decode, collate, train, rank, world_size, seed)
