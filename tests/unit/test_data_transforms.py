"""Joint transforms keep images, boxes and masks aligned; collate pads and masks correctly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.boxes import box_cxcywh_to_xyxy, masks_to_boxes
from pipeline.data.collate import collate_classification, collate_detection
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    ClassificationAugment,
    ClassificationEval,
    DetectionAugment,
    DetectionEval,
    crop,
    hflip,
    normalize_images,
    resize,
    scaled_size,
    to_model_inputs,
)


@st.composite
def scenes(draw):
    """A random image with rectangular objects whose masks fill their boxes exactly."""
    width, height = draw(st.integers(24, 90)), draw(st.integers(24, 90))
    count = draw(st.integers(0, 5))
    boxes, masks = [], torch.zeros((count, height, width), dtype=torch.bool)
    for i in range(count):
        x0, y0 = draw(st.integers(0, width - 4)), draw(st.integers(0, height - 4))
        x1, y1 = draw(st.integers(x0 + 3, width)), draw(st.integers(y0 + 3, height))
        boxes.append([x0, y0, x1, y1])
        masks[i, y0:y1, x0:x1] = True
    pixels = np.random.default_rng(draw(st.integers(0, 1000))).integers(
        0, 255, (height, width, 3), np.uint8
    )
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.arange(count),
        "masks": masks,
        "area": torch.ones(count),
        "size": torch.tensor([height, width]),
    }
    return Image.fromarray(pixels), target


def _assert_aligned(image: torch.Tensor, target: dict) -> None:
    height, width = image.shape[1:] if isinstance(image, torch.Tensor) else (image.height, image.width)
    assert image.dtype == torch.uint8 if isinstance(image, torch.Tensor) else image.mode == "RGB"
    assert target["masks"].shape[1:] == (height, width)
    assert tuple(target["size"].tolist()) == (height, width)
    assert (
        len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) == len(target["area"])
    )
    if len(target["boxes"]):
        assert target["masks"].flatten(1).any(1).all(), "an object without pixels was kept"
        torch.testing.assert_close(
            masks_to_boxes(target["masks"]), target["boxes"], atol=1.0, rtol=0
        )


@settings(max_examples=40, deadline=None)
@given(scenes(), st.integers(0, 2**31))
def test_train_augmentation_keeps_masks_and_boxes_aligned(scene, seed):
    image, target = scene
    augment = DetectionAugment(
        scales=(16, 32, 48, 64), max_size=80, crop_prob=0.5, crop_resize_scales=(30, 50),
        crop_min_size=12, crop_max_size=40,
    )  # fmt: skip
    image, target = augment(image, target, random.Random(seed))
    _assert_aligned(image, target)
    assert max(image.shape[1:]) <= 80


@settings(max_examples=40, deadline=None)
@given(scenes(), st.integers(0, 80), st.integers(0, 80), st.integers(1, 80), st.integers(1, 80))
def test_crop_clips_and_drops(scene, top, left, height, width):
    image, target = scene
    height, width = (
        min(height, image.height - min(top, image.height - 1)),
        min(width, image.width - min(left, image.width - 1)),
    )
    top, left = min(top, image.height - 1), min(left, image.width - 1)
    cropped, out = crop(image, target, top, left, height, width)
    assert tuple(cropped.shape) == (3, height, width)
    _assert_aligned(cropped, out)
    # An object survives exactly when its box overlaps the crop window.
    boxes = target["boxes"]
    overlaps = (
        (boxes[:, 0] < left + width)
        & (boxes[:, 2] > left)
        & (boxes[:, 1] < top + height)
        & (boxes[:, 3] > top)
    )
    assert out["labels"].tolist() == target["labels"][overlaps].tolist()


@settings(max_examples=30, deadline=None)
@given(scenes())
def test_flip_twice_is_identity_and_flip_mirrors_pixels(scene):
    image, target = scene
    flipped, out = hflip(image, target)
    _assert_aligned(flipped, out)
    assert np.array_equal(np.asarray(flipped)[:, ::-1], np.asarray(image))
    back, again = hflip(flipped, out)
    torch.testing.assert_close(again["boxes"], target["boxes"])
    assert torch.equal(again["masks"], target["masks"])


def test_resize_respects_shorter_side_and_max_size():
    assert scaled_size(200, 100, 50, None) == (100, 50)
    assert scaled_size(100, 200, 50, None) == (50, 100)
    assert scaled_size(400, 100, 50, 100) == (100, 25)
    image = Image.new("RGB", (60, 30))
    target = {
        "boxes": torch.tensor([[6.0, 3.0, 30.0, 15.0]]),
        "labels": torch.tensor([0]),
        "area": torch.tensor([288.0]),
    }
    out_image, out = resize(image, target, 60, None)
    assert tuple(out_image.shape) == (3, 60, 120)
    torch.testing.assert_close(out["boxes"], torch.tensor([[12.0, 6.0, 60.0, 30.0]]))
    torch.testing.assert_close(out["area"], torch.tensor([1152.0]))


def test_eval_transform_is_deterministic_and_model_inputs_are_normalised():
    image = Image.new("RGB", (80, 40), tuple(int(255 * m) for m in IMAGENET_MEAN))
    target = {"boxes": torch.tensor([[0.0, 0.0, 40.0, 20.0]]), "labels": torch.tensor([1])}
    a = to_model_inputs(*DetectionEval(20, 100)(image, target))
    b = to_model_inputs(*DetectionEval(20, 100)(image, target))
    assert a[0].shape == (3, 20, 40) and a[0].dtype == torch.uint8 and torch.equal(a[0], b[0])
    assert normalize_images(a[0][None]).abs().max() < 0.02  # the mean colour normalises to ~0
    torch.testing.assert_close(
        box_cxcywh_to_xyxy(a[1]["boxes"]), torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    )


def test_same_seed_same_augmentation_different_seed_differs():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8))
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([0])}
    augment = DetectionAugment(
        scales=(32, 48, 64),
        max_size=128,
        crop_resize_scales=(48,),
        crop_min_size=20,
        crop_max_size=40,
    )
    runs = [to_model_inputs(*augment(image, target, random.Random(s)))[0] for s in (1, 1, 2, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert any(r.shape != runs[0].shape or not torch.equal(r, runs[0]) for r in runs[2:])


def test_classification_transforms_shapes():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    out = ClassificationAugment(32)(image, random.Random(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert ClassificationEval(32)(image).shape == (3, 32, 32)
    left, top, right, bottom = ClassificationAugment(32, scale=(0.5, 0.5), ratio=(1, 1)).crop_box(
        100, 100, random.Random(0)
    )
    assert (right - left, bottom - top) == (71, 71)


def test_collate_detection_pads_and_marks_padding():
    samples = [
        (
            torch.ones(3, 10, 20),
            {
                "boxes": torch.zeros(1, 4),
                "labels": torch.tensor([0]),
                "masks": torch.ones(1, 10, 20, dtype=torch.bool),
            },
        ),
        (
            torch.ones(3, 15, 12),
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        ),
    ]
    batch = collate_detection(samples, size_divisibility=8)
    assert batch["images"].shape == (2, 3, 16, 24) and batch["padding_mask"].shape == (2, 16, 24)
    for i, (image, _) in enumerate(samples):
        h, w = image.shape[1:]
        assert (
            not batch["padding_mask"][i, :h, :w].any()
            and batch["padding_mask"][i].sum() == 16 * 24 - h * w
        )
        assert batch["images"][i][:, batch["padding_mask"][i]].abs().sum() == 0
    assert batch["targets"][0]["masks"].shape == (1, 10, 20)
    with pytest.raises(ValueError):
        collate_detection([])


def test_collate_classification():
    batch = collate_classification([(torch.zeros(3, 4, 4), 2), (torch.ones(3, 4, 4), 5)])
    assert batch["images"].shape == (2, 3, 4, 4) and batch["labels"].tolist() == [2, 5]
    assert batch["labels"].dtype == torch.int64


def test_segmentation_formats_decode_to_the_same_mask():
    from pycocotools import mask as mask_utils

    from pipeline.data.decoding import decode_segmentation

    polygon = [[2.0, 1.0, 7.0, 1.0, 7.0, 5.0, 2.0, 5.0]]
    from_polygon = decode_segmentation(polygon, 8, 10)
    assert from_polygon.shape == (8, 10) and from_polygon.sum() > 0
    compressed = mask_utils.encode(np.asfortranarray(from_polygon.astype(np.uint8)))
    as_json = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    assert np.array_equal(decode_segmentation(as_json, 8, 10), from_polygon)
    column_major = from_polygon.flatten(order="F").astype(int)
    runs, value, count = [], 0, 0
    for pixel in column_major:  # uncompressed RLE: alternating run lengths, starting with 0s
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    runs.append(count)
    assert np.array_equal(
        decode_segmentation({"size": [8, 10], "counts": runs}, 8, 10), from_polygon
    )
    assert (
        decode_segmentation([], 8, 10).sum() == 0
        and decode_segmentation([[1, 2]], 8, 10).sum() == 0
    )
