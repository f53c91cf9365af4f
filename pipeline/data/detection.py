"""The detection loader: COCO-style shards -> batches of the project's detection convention.

``build_detection_loader(cfg, split, rank, world_size, seed)`` reads ``<cfg.shards>/<split>/``.
Training splits give a :class:`~pipeline.data.stream.TrainLoader` (resampled, fixed steps per
epoch, exactly resumable; see :mod:`pipeline.data.stream` for the guarantee); other splits give
an :class:`~pipeline.data.eval_stream.EvalLoader` (every image exactly once over the ranks).
Both expose ``steps_per_epoch``, ``categories``, ``num_classes``, ``category_map`` (COCO id <->
contiguous label, for evaluation), ``skipped`` (bad samples by reason), ``state_dict()`` and
``load_state_dict()``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pipeline.config import path_field
from pipeline.data.categories import CategoryMap
from pipeline.data.collate import collate_detection
from pipeline.data.decoding import coco_target, decode_json, open_image
from pipeline.data.errors import DataError, SkipSample
from pipeline.data.eval_stream import EvalLoader, build_split_loader
from pipeline.data.shards import load_shard_info
from pipeline.data.stream import TrainLoader
from pipeline.data.transforms import DetectionAugment, DetectionEval, to_model_inputs


@dataclass
class DetectionDataConfig:
    """Where the detection shards are and how to batch and augment them."""

    # Shard set root holding one folder per split (e.g. "data/samples/detect"); relative to the
    # file that names it.
    shards: str = path_field()
    # Images per batch on each rank.
    batch_size: int = 2
    # DataLoader worker processes per rank (0 = decode in the training process).
    num_workers: int = 2
    # Shorter-side sizes (pixels) drawn at random for training (DETR: 480..800 step 32).
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    # Longest side after resizing, training and evaluation.
    max_size: int = 1333
    # Shorter side for evaluation.
    eval_size: int = 800
    # Probability of DETR's resize -> random-size crop -> resize branch.
    crop_prob: float = 0.5
    # Shorter sides before the crop in that branch.
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    # Crop side range (pixels) in that branch.
    crop_min_size: int = 384
    crop_max_size: int = 600
    # Probability of a horizontal flip.
    flip_prob: float = 0.5
    # Decode instance masks (needed by segmentation stages only: costs time and memory).
    with_masks: bool = False
    # Samples held in the shuffle buffer of each stream.
    shuffle_buffer: int = 500
    # Batches per epoch per rank; None = samples // (batch_size * world_size), at least 1.
    steps_per_epoch: int | None = None
    # Pad batches to a multiple of this (1 = no rounding).
    size_divisibility: int = 1
    # Images per evaluation batch; None = batch_size.
    eval_batch_size: int | None = None
    # Splits read as training streams; any other split is read once, in order.
    train_splits: list[str] = field(default_factory=lambda: ["train"])

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "max_size": self.max_size,
            "eval_size": self.eval_size,
        }
        positive.update(crop_min_size=self.crop_min_size, shuffle_buffer=self.shuffle_buffer)
        bad = [name for name, value in positive.items() if value < 1]
        if bad:
            raise ValueError(f"DetectionDataConfig: {bad} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(
                f"DetectionDataConfig.num_workers must be >= 0, got {self.num_workers}"
            )
        if not self.train_scales or min(self.train_scales) < 1:
            raise ValueError(
                f"DetectionDataConfig.train_scales must be positive sizes, got {self.train_scales}"
            )
        if self.crop_min_size > self.crop_max_size:
            raise ValueError(
                f"DetectionDataConfig: crop_min_size {self.crop_min_size} > crop_max_size {self.crop_max_size}"
            )
        for name in ("crop_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"DetectionDataConfig.{name} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(
                f"DetectionDataConfig.steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}"
            )


def build_detection_transform(
    cfg: DetectionDataConfig, train: bool
) -> DetectionAugment | DetectionEval:
    """The training augmentation or the evaluation resize described by ``cfg``."""
    if not train:
        return DetectionEval(cfg.eval_size, cfg.max_size)
    return DetectionAugment(
        scales=tuple(cfg.train_scales),
        max_size=cfg.max_size,
        crop_prob=cfg.crop_prob,
        crop_resize_scales=tuple(cfg.crop_resize_scales),
        crop_min_size=cfg.crop_min_size,
        crop_max_size=cfg.crop_max_size,
        flip_prob=cfg.flip_prob,
    )


@dataclass(frozen=True)
class DetectionDecoder:
    """Raw shard sample -> (image (3, H, W) uint8, target); picklable for workers."""

    label_of: dict[int, int]
    transform: DetectionAugment | DetectionEval
    with_masks: bool

    def __call__(self, raw: dict, rng: random.Random | None, dropped: Counter):
        key = raw.get("__key__", "?")
        record = decode_json(raw.get("json"), key)
        image = open_image(raw.get("jpg"), key)  # decoded by the transform, at its scale
        target = coco_target(record, image.size, self.label_of, self.with_masks, dropped)
        try:
            image, target = self.transform(image, target, rng)
        except SkipSample as skip:
            raise SkipSample(skip.reason, f"{key}: {skip.detail}") from skip
        return to_model_inputs(image, target)


def build_detection_loader(
    cfg: DetectionDataConfig,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> TrainLoader | EvalLoader:
    """The loader of ``<cfg.shards>/<split>`` for this rank (see the module docstring)."""
    info = load_shard_info(Path(cfg.shards) / split)
    if info.kind != "detection":
        raise DataError(
            f"{info.root} holds {info.kind} shards; DetectionDataConfig.shards needs detection shards"
        )
    category_map = CategoryMap(info.categories)
    train = split in cfg.train_splits
    decode = DetectionDecoder(
        {int(c["id"]): category_map.to_label(c["id"]) for c in info.categories},
        build_detection_transform(cfg, train),
        cfg.with_masks,
    )
    collate = partial(collate_detection, size_divisibility=cfg.size_divisibility)
    return build_split_loader(cfg, info, decode, collate, train, rank, world_size, seed)
