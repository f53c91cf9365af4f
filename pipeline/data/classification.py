"""The classification loader: ``<key>.jpg`` + ``<key>.cls`` shards -> {"images", "labels"}.

``build_classification_loader(cfg, split, rank, world_size, seed)`` reads
``<cfg.shards>/<split>/``; training splits are resampled with a fixed number of steps per epoch
and exactly resumable (see :mod:`pipeline.data.stream`), other splits are read once.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pipeline.config import path_field
from pipeline.data.collate import collate_classification, collate_jpeg_classification
from pipeline.data.decoding import open_image
from pipeline.data.device_decode import jpeg_sample
from pipeline.data.errors import DataError, SkipSample
from pipeline.data.eval_stream import EvalLoader, build_split_loader
from pipeline.data.shards import load_shard_info
from pipeline.data.stream import TrainLoader
from pipeline.data.transforms import ClassificationAugment, ClassificationEval

DecodeOn = Literal["cpu", "device"]


@dataclass
class ClassificationDataConfig:
    """Where the classification shards are and how to batch and augment them."""

    # Shard set root holding one folder per split (e.g. "data/samples/classify"); relative to the
    # file that names it.
    shards: str = path_field()
    # Images per batch on each rank.
    batch_size: int = 32
    # DataLoader worker processes per rank (0 = decode in the training process).
    num_workers: int = 2
    # Side (pixels) of the square training and evaluation crops.
    image_size: int = 224
    # Area fraction range of the random resized crop.
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    # Probability of a horizontal flip.
    flip_prob: float = 0.5
    # Samples held in the shuffle buffer of each stream.
    shuffle_buffer: int = 1000
    # Batches per epoch per rank; None = samples // (batch_size * world_size), at least 1.
    steps_per_epoch: int | None = None
    # Images per evaluation batch; None = batch_size.
    eval_batch_size: int | None = None
    # Splits read as training streams; any other split is read once, in order.
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    # Where training images are decoded and augmented: "cpu" (the loader workers) or "device"
    # (the workers pass JPEG bytes and crop/flip decisions; nvJPEG on a GPU; same batches).
    decode_on: DecodeOn = "cpu"

    def __post_init__(self) -> None:
        bad = [n for n in ("batch_size", "image_size", "shuffle_buffer") if getattr(self, n) < 1]
        if bad:
            raise ValueError(f"ClassificationDataConfig: {bad} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(
                f"ClassificationDataConfig.num_workers must be >= 0, got {self.num_workers}"
            )
        scale = self.crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(
                f"ClassificationDataConfig.crop_scale must be [low, high] in (0, 1], got {scale}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(
                f"ClassificationDataConfig.flip_prob must be in [0, 1], got {self.flip_prob}"
            )
        if self.decode_on not in get_args(DecodeOn):
            raise ValueError(
                f"ClassificationDataConfig.decode_on must be one of {list(get_args(DecodeOn))}, got {self.decode_on!r}"
            )
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(
                f"ClassificationDataConfig.steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}"
            )


@dataclass(frozen=True)
class ClassificationDecoder:
    """Raw shard sample -> (image (3, S, S) uint8, label); picklable for workers.

    ``raw_jpeg`` (decode_on: device, training): -> ((JPEG bytes, crop box, flip), label) instead,
    with the same rng draws (see pipeline.data.device_decode).
    """

    num_classes: int
    transform: ClassificationAugment | ClassificationEval
    raw_jpeg: bool = False

    def __call__(self, raw: dict, rng: random.Random | None, dropped: Counter):
        key = raw.get("__key__", "?")
        try:
            label = int(raw["cls"])
        except (KeyError, ValueError) as exn:
            raise SkipSample("bad_label", f"{key}: {exn}") from exn
        if not 0 <= label < self.num_classes:
            raise SkipSample("bad_label", f"{key}: label {label} not in [0, {self.num_classes})")
        image = open_image(raw.get("jpg"), key)  # decoded by the transform, at its scale
        try:
            if self.raw_jpeg:
                return jpeg_sample(raw["jpg"], image, self.transform, rng), label
            return self.transform(image, rng), label
        except SkipSample as skip:
            raise SkipSample(skip.reason, f"{key}: {skip.detail}") from skip


def build_classification_loader(
    cfg: ClassificationDataConfig,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> TrainLoader | EvalLoader:
    """The loader of ``<cfg.shards>/<split>`` for this rank (see the module docstring)."""
    info = load_shard_info(Path(cfg.shards) / split)
    if info.kind != "classification":
        raise DataError(
            f"{info.root} holds {info.kind} shards; ClassificationDataConfig.shards needs classification shards"
        )
    train = split in cfg.train_splits
    if train:
        transform = ClassificationAugment(
            cfg.image_size, tuple(cfg.crop_scale), flip_prob=cfg.flip_prob
        )
    else:
        transform = ClassificationEval(cfg.image_size)
    # Evaluation splits are decoded by the workers whatever decode_on says (read once, small).
    on_device = train and cfg.decode_on == "device"
    decode = ClassificationDecoder(info.num_classes, transform, raw_jpeg=on_device)
    collate = collate_jpeg_classification if on_device else collate_classification
    return build_split_loader(cfg, info, decode, collate, train, rank, world_size, seed)
