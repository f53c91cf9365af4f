"""Joint image + target transforms (DETR's multi-scale recipe) and classification transforms.

Plain PIL + torch, no torchvision. Every random transform takes an explicit ``random.Random``
so that a sample's augmentation is a pure function of its seed (what makes loader resume exact).

During augmentation a detection target holds ``boxes`` (n, 4) float xyxy in pixels of the
current image, ``labels`` (n,) int64, optional ``masks`` (n, H, W) bool, and ``size`` (2,) int64
(h, w). :func:`to_model_inputs` turns it into the batch convention: image (3, H, W) float
normalised with ImageNet mean/std, boxes (n, 4) cx, cy, w, h normalised to [0, 1].
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pipeline.boxes import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict[str, Tensor]


def scaled_size(width: int, height: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(w, h) with the shorter side ``size``, shrunk so the longer side stays <= ``max_size``."""
    short, long = min(width, height), max(width, height)
    if max_size is not None and long / short * size > max_size:
        size = max(1, int(round(max_size * short / long)))
    if width <= height:
        return size, max(1, int(round(size * height / width)))
    return max(1, int(round(size * width / height))), size


def resize(image: Image.Image, target: Target, size: int, max_size: int | None) -> tuple:
    """Resize the shorter side to ``size`` (bilinear image, nearest-exact masks, scaled boxes)."""
    new_w, new_h = scaled_size(image.width, image.height, size, max_size)
    ratio = torch.tensor([new_w / image.width, new_h / image.height] * 2)
    target = dict(target, boxes=target["boxes"] * ratio, size=torch.tensor([new_h, new_w]))
    if "area" in target:
        target["area"] = target["area"] * (ratio[0] * ratio[1])
    if "masks" in target:
        masks = target["masks"][:, None].float()
        if masks.shape[0]:
            masks = F.interpolate(masks, size=(new_h, new_w), mode="nearest-exact")
        target["masks"] = masks[:, 0].reshape(-1, new_h, new_w) > 0.5
    return image.resize((new_w, new_h), Image.BILINEAR), target


def crop(image: Image.Image, target: Target, top: int, left: int, height: int, width: int) -> tuple:
    """Crop a region; boxes are clipped to it and objects left with nothing inside are dropped."""
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target = dict(target, boxes=boxes, size=torch.tensor([height, width]))
    if "area" in target:  # as DETR: the area of what is left is the clipped box's
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if "masks" in target:
        target["masks"] = target["masks"][:, top : top + height, left : left + width]
        keep &= target["masks"].flatten(1).any(1)
    for key in ("boxes", "labels", "masks", "area", "iscrowd"):
        if key in target:
            target[key] = target[key][keep]
    return image.crop((left, top, left + width, top + height)), target


def hflip(image: Image.Image, target: Target) -> tuple:
    """Mirror left-right: x0' = W - x1, x1' = W - x0; masks flipped."""
    boxes = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [image.width, 0, image.width, 0]
    )
    target = dict(target, boxes=boxes)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.transpose(Image.FLIP_LEFT_RIGHT), target


def random_size_crop(
    image: Image.Image, target: Target, min_size: int, max_size: int, rng: random.Random
) -> tuple:
    """DETR's RandomSizeCrop: a crop of random size in [min_size, max_size] at a random place."""
    width = rng.randint(min(min_size, image.width), min(image.width, max_size))
    height = rng.randint(min(min_size, image.height), min(image.height, max_size))
    top, left = rng.randint(0, image.height - height), rng.randint(0, image.width - width)
    return crop(image, target, top, left, height, width)


@dataclass(frozen=True)
class DetectionAugment:
    """DETR's training recipe: flip, then either a multi-scale resize or resize-crop-resize.

    Mirrors DETR's ``make_coco_transforms('train')`` with the sizes as parameters.
    """

    scales: Sequence[int]
    max_size: int
    crop_prob: float = 0.5
    crop_resize_scales: Sequence[int] = (400, 500, 600)
    crop_min_size: int = 384
    crop_max_size: int = 600
    flip_prob: float = 0.5

    def __call__(self, image: Image.Image, target: Target, rng: random.Random) -> tuple:
        if rng.random() < self.flip_prob:
            image, target = hflip(image, target)
        if rng.random() < self.crop_prob:
            image, target = resize(image, target, rng.choice(list(self.crop_resize_scales)), None)
            image, target = random_size_crop(
                image, target, self.crop_min_size, self.crop_max_size, rng
            )
        return resize(image, target, rng.choice(list(self.scales)), self.max_size)


@dataclass(frozen=True)
class DetectionEval:
    """Evaluation: a fixed resize of the shorter side (no randomness)."""

    size: int
    max_size: int

    def __call__(
        self, image: Image.Image, target: Target, rng: random.Random | None = None
    ) -> tuple:
        return resize(image, target, self.size, self.max_size)


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> (3, H, W) float32 normalised with the ImageNet mean and std."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    pixels = array.permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def to_model_inputs(image: Image.Image, target: Target) -> tuple[Tensor, Target]:
    """Final step: normalised image tensor and boxes as cx, cy, w, h in [0, 1] of the image."""
    height, width = image.height, image.width
    boxes = target["boxes"].reshape(-1, 4)
    boxes = box_xyxy_to_cxcywh(boxes) / torch.tensor(
        [width, height, width, height], dtype=torch.float32
    )
    return image_to_tensor(image), dict(target, boxes=boxes.clamp(0, 1))


@dataclass(frozen=True)
class ClassificationAugment:
    """Random resized crop (area ``scale``, aspect ``ratio``), horizontal flip, to ``size``."""

    size: int
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop; falls back to the whole image after 10 tries."""
        area = width * height
        log_ratio = (np.log(self.ratio[0]), np.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = float(np.exp(rng.uniform(*log_ratio)))
            w, h = (
                int(round((target_area * aspect) ** 0.5)),
                int(round((target_area / aspect) ** 0.5)),
            )
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        return 0, 0, width, height

    def __call__(self, image: Image.Image, rng: random.Random) -> Tensor:
        box = self.crop_box(image.width, image.height, rng)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box)
        if rng.random() < self.flip_prob:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image_to_tensor(image)


@dataclass(frozen=True)
class ClassificationEval:
    """Resize the shorter side to ``size / crop_fraction``, then centre-crop ``size``."""

    size: int
    crop_fraction: float = 0.875

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        width, height = scaled_size(
            image.width, image.height, int(round(self.size / self.crop_fraction)), None
        )
        image = image.resize((width, height), Image.BILINEAR)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return image_to_tensor(image.crop((left, top, left + self.size, top + self.size)))
