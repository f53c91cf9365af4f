"""Reduced-scale JPEG decoding and the uint8 loader path keep images and targets consistent."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.collate import collate_detection, model_images
from pipeline.data.decoding import decode_region, draft_scale, open_image
from pipeline.data.transforms import (
    ClassificationAugment,
    ClassificationEval,
    DetectionAugment,
    image_to_tensor,
    normalize_images,
    to_model_inputs,
)


def _jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=95)
    return out.getvalue()


def _scene(width: int = 800, height: int = 600) -> tuple[bytes, dict]:
    """A grey image with one bright rectangle, its box and mask (xyxy pixels)."""
    array = np.full((height, width, 3), 40, np.uint8)
    x0, y0, x1, y1 = 200, 160, 520, 400
    array[y0:y1, x0:x1] = 230
    mask = np.zeros((1, height, width), bool)
    mask[0, y0:y1, x0:x1] = True
    target = {
        "boxes": torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32),
        "labels": torch.tensor([3]),
        "masks": torch.from_numpy(mask),
    }
    return _jpeg(array), target


@pytest.mark.parametrize(
    "region, out, expected",
    [((0, 0, 800, 600), (100, 75), 8), ((0, 0, 800, 600), (200, 150), 4),
     ((0, 0, 400, 300), (180, 140), 2), ((0, 0, 100, 100), (90, 90), 1)],
)  # fmt: skip
def test_draft_scale_keeps_at_least_the_output_pixels(region, out, expected):
    assert draft_scale(region, *out) == expected


def test_decode_region_scales_the_region_with_the_image():
    data, _ = _scene()
    image, region = decode_region(open_image(data, "k"), (200, 160, 520, 400), 40, 30)
    assert image.size == (100, 75) and region == (25.0, 20.0, 65.0, 50.0)  # 1/8 scale
    pixels = np.asarray(image)
    assert pixels[25:45, 30:60].min() > 200 and pixels[:15].max() < 60  # the rectangle moved too


@pytest.mark.parametrize("seed", range(6))
def test_drafted_augmentation_keeps_boxes_and_masks_on_the_object(seed):
    data, target = _scene()
    augment = DetectionAugment(scales=(96, 128), max_size=200, crop_resize_scales=(300,),
                               crop_min_size=150, crop_max_size=250)  # fmt: skip
    image, out = augment(open_image(data, "k"), target, random.Random(seed))
    assert tuple(image.shape[1:]) == tuple(out["size"].tolist()) and image.shape[2] < 800 / 2
    pixels = image.float().mean(0).numpy()  # grey
    for box, mask in zip(out["boxes"], out["masks"]):
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        assert pixels[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].mean() > 200  # bright inside the box
        assert pixels[mask.numpy()].mean() > 180  # the mask covers the bright pixels
        ys, xs = np.nonzero(mask.numpy())
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
    bright = pixels > 135
    outside = ~np.any(out["masks"].numpy(), 0)
    assert bright[outside].mean() < 0.02  # no bright pixels where no mask is


def test_drafted_decode_matches_full_decode_closely():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (60, 80, 3)), np.ones((10, 10, 1))).astype(np.uint8)
    data = _jpeg(smooth)
    augment = ClassificationAugment(64, flip_prob=0.0)
    drafted = augment(open_image(data, "k"), random.Random(1)).float()
    full = augment(Image.open(io.BytesIO(data)).convert("RGB"), random.Random(1)).float()
    assert (drafted - full).abs().mean() < 6  # same content, a few grey levels apart


def test_uint8_path_equals_the_float_path_after_normalisation():
    array = np.random.default_rng(1).integers(0, 255, (90, 120, 3), np.uint8)
    image = Image.fromarray(array)  # already decoded: no drafting, the same pixels as before
    for transform in (ClassificationEval(48), ClassificationAugment(48)):
        resized = transform(image, random.Random(0))
        assert resized.dtype == torch.uint8
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([0])}
    small = image.resize((60, 45))
    samples = [to_model_inputs(image, target), to_model_inputs(small, target)]
    batch = collate_detection(samples, size_divisibility=8)
    normalised = model_images(batch, "cpu", torch.float32)
    before = [image_to_tensor(image), image_to_tensor(small)]  # the float path of earlier loaders
    for i, reference in enumerate(before):
        h, w = reference.shape[1:]
        assert (normalised[i, :, :h, :w] - reference).abs().max() <= 1 / 255 / 0.224
        assert normalised[i][:, batch["padding_mask"][i]].abs().sum() == 0  # padding stays 0
    assert torch.equal(normalize_images(normalised), normalised)  # float input passes through
