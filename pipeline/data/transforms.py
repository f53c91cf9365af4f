"""Joint image + target transforms (DETR's multi-scale recipe) and classification transforms.

PIL decodes, torch resamples (its uint8 bilinear kernel), no torchvision. Every random transform
takes an explicit ``random.Random`` so that a sample's augmentation is a pure function of its seed
(what makes loader resume exact).

During augmentation a detection target holds ``boxes`` (n, 4) float xyxy in pixels of the
current image, ``labels`` (n,) int64, optional ``masks`` (n, H, W) bool, and ``size`` (2,) int64
(h, w). :func:`to_model_inputs` turns it into the batch convention: image (3, H, W) uint8 RGB,
boxes (n, 4) cx, cy, w, h normalised to [0, 1].

Images may arrive lazily opened (:func:`pipeline.data.decoding.open_image`): every transform
decodes them once, at the reduced JPEG scale its crop allows (:func:`decode_region`), with one
resampling per sample (:func:`resample_image`, which returns the (3, H, W) uint8 pixels). Images
cross the loader pipe as uint8 (a quarter of float32's bytes, no per-pixel work in the
workers); :func:`normalize_images` turns a batch into the model's input (float, ImageNet
mean/std, padding 0) on the training device.
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

from pipeline.data.decoding import decode_region

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict[str, Tensor]


def scaled_size(width: int, height: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(w, h) with the shorter side ``size``, shrunk so the longer side stays <= ``max_size``."""
    short, long = min(width, height), max(width, height)
    if max_size is not None and long / short * size > max_size:
        size = max(1, int(round(max_size * short / long)))
    # Rounding could push the longer side one pixel past max_size; clamp it.
    long_side = max(1, int(round(size * long / short)))
    long_side = long_side if max_size is None else min(long_side, max_size)
    return (size, long_side) if width <= height else (long_side, size)


def _sample_masks(masks: Tensor, region: Sequence[float], out_w: int, out_h: int) -> Tensor:
    """Nearest sampling of (n, H, W) masks on the pixel centres of ``region`` -> (n, out_h, out_w).

    Output pixel (u, v) takes the source pixel under its centre, so a mask edge lands within
    half a pixel of where the same map puts a box edge. numpy, not torch: single-threaded, so
    loader processes do not compete for cores with torch's intra-op threads.
    """
    x0, y0, x1, y1 = region
    height, width = masks.shape[-2:]
    cols = np.floor(x0 + (np.arange(out_w) + 0.5) * ((x1 - x0) / out_w)).astype(np.int64)
    rows = np.floor(y0 + (np.arange(out_h) + 0.5) * ((y1 - y0) / out_h)).astype(np.int64)
    array = masks.numpy()
    return torch.from_numpy(
        np.ascontiguousarray(array[:, rows.clip(0, height - 1)][:, :, cols.clip(0, width - 1)])
    )


def resample_target(target: Target, region: Sequence[float], out_w: int, out_h: int) -> Target:
    """The target of ``region`` (x0, y0, x1, y1, pixels) resized to (out_w, out_h).

    Boxes are clipped to the region; objects left without area (or, with masks, without pixels)
    are dropped. Masks are sampled once (nearest) on the output pixel centres.
    """
    # numpy on the small box arrays: single-threaded (see _sample_masks).
    x0, y0, x1, y1 = (float(v) for v in region)
    boxes = target["boxes"].numpy().reshape(-1, 4) - np.array([x0, y0, x0, y0], np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, x1 - x0)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, y1 - y0)
    boxes = (boxes * np.array([out_w / (x1 - x0), out_h / (y1 - y0)] * 2)).astype(np.float32)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target = dict(target, boxes=torch.from_numpy(boxes), size=torch.tensor([out_h, out_w]))
    if "area" in target:  # as DETR: the area of what is left is the clipped box's
        target["area"] = torch.from_numpy((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    if "masks" in target:
        target["masks"] = _sample_masks(target["masks"], region, out_w, out_h)
        keep &= target["masks"].numpy().reshape(len(boxes), out_h * out_w).any(1)
    for key in ("boxes", "labels", "masks", "area", "iscrowd"):
        if key in target:
            target[key] = torch.from_numpy(np.ascontiguousarray(target[key].numpy()[keep]))
    return target


def resample_image(
    image: Image.Image, region: Sequence[float], out_w: int, out_h: int, flip: bool = False
) -> tuple[Tensor, tuple[float, float, float, float]]:
    """Decode (at the reduced scale ``region`` allows) and resize ``region`` to (out_w, out_h).

    Returns the pixels, (3, out_h, out_w) uint8 RGB, and the region they show, in pixels of the
    full-size image: ``region`` snapped to whole pixels of the decoded image (at most half a
    decoded pixel per edge), which the target must be resampled with so that boxes and masks stay
    on the pixels. The resize is torch's uint8 bilinear with antialiasing (PIL's filter, 3x faster
    than PIL's own at COCO sizes on one core).

    ``flip``: ``region`` is given in the mirrored image, and the output is mirrored: the same
    pixels as flipping first, without decoding or flipping the full-size image.
    """
    x0, y0, x1, y1 = (float(v) for v in region)
    full_width = image.width  # before decoding: a JPEG drafted in place reports its reduced size
    if flip:
        x0, x1 = full_width - x1, full_width - x0
    pixels, box = decode_region(image, (x0, y0, x1, y1), out_w, out_h)
    scale = (x1 - x0) / (box[2] - box[0]) if box[2] > box[0] else 1.0
    left, top, right, bottom = _whole_pixels(box, pixels.width, pixels.height)
    if (left, top, right, bottom) != (0, 0, pixels.width, pixels.height):
        pixels = pixels.crop((left, top, right, bottom))  # copies only the rows' crop
    # (1, 3, h, w) over the HWC pixels: a channels-last contiguous tensor, which torch resizes
    # with its vectorised uint8 kernel (0.13 instead of 0.20 ms for a 300 px crop to 224 on one
    # core; a strided crop view, or a CHW copy, takes the generic path).
    image_nchw = torch.from_numpy(np.array(pixels, dtype=np.uint8))[None].permute(0, 3, 1, 2)
    mirror_output = flip
    # mirror the smaller of input and output
    if flip and image_nchw.shape[2] * image_nchw.shape[3] <= out_h * out_w:
        image_nchw, mirror_output = image_nchw.flip(-1), False
    if tuple(image_nchw.shape[2:]) != (out_h, out_w):
        image_nchw = F.interpolate(image_nchw, size=(out_h, out_w), mode="bilinear", antialias=True,
                                   align_corners=False)
    chw = (image_nchw[0].flip(-1) if mirror_output else image_nchw[0]).contiguous()
    shown = (left * scale, top * scale, right * scale, bottom * scale)
    if flip:
        shown = (full_width - shown[2], shown[1], full_width - shown[0], shown[3])
    return chw, shown


def _whole_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` (x0, y0, x1, y1) rounded to whole pixels inside a width x height image, >= 1 px."""
    left = min(max(round(box[0]), 0), width - 1)
    top = min(max(round(box[1]), 0), height - 1)
    right = min(max(round(box[2]), left + 1), width)
    bottom = min(max(round(box[3]), top + 1), height)
    return left, top, right, bottom


def resample(
    image: Image.Image, target: Target, region: Sequence[float], out_w: int, out_h: int
) -> tuple:
    """Crop ``region`` (x0, y0, x1, y1, pixels, may be fractional) and resize it to (out_w, out_h).

    One resampling of the image (bilinear) and of the masks (nearest), however many resizes and
    crops it stands for: repeated resampling would drift masks away from boxes. Boxes are
    clipped to the region; objects left without area (or, with masks, without pixels) are dropped.
    """
    pixels, shown = resample_image(image, region, out_w, out_h)
    return pixels, resample_target(target, shown, out_w, out_h)


def resize(image: Image.Image, target: Target, size: int, max_size: int | None) -> tuple:
    """Resize the shorter side to ``size`` (longer side <= ``max_size``)."""
    out_w, out_h = scaled_size(image.width, image.height, size, max_size)
    return resample(image, target, (0, 0, image.width, image.height), out_w, out_h)


def crop(image: Image.Image, target: Target, top: int, left: int, height: int, width: int) -> tuple:
    """Crop a region; boxes are clipped to it and objects left with nothing inside are dropped."""
    return resample(image, target, (left, top, left + width, top + height), width, height)


def hflip_target(target: Target, width: int) -> Target:
    """Mirror a target left-right in an image ``width`` wide: x0' = W - x1, x1' = W - x0."""
    boxes = target["boxes"].numpy().reshape(-1, 4)[:, [2, 1, 0, 3]] * np.array(
        [-1, 1, -1, 1], np.float32
    )
    boxes += np.array([width, 0, width, 0], np.float32)
    target = dict(target, boxes=torch.from_numpy(boxes))
    if "masks" in target:
        target["masks"] = torch.from_numpy(np.ascontiguousarray(target["masks"].numpy()[..., ::-1]))
    return target


def hflip(image: Image.Image, target: Target) -> tuple:
    """Mirror left-right: x0' = W - x1, x1' = W - x0; masks flipped."""
    return image.transpose(Image.FLIP_LEFT_RIGHT), hflip_target(target, image.width)


def random_size_crop_region(
    width: int, height: int, min_size: int, max_size: int, rng: random.Random
) -> tuple[int, int, int, int]:
    """DETR's RandomSizeCrop: (x0, y0, x1, y1) of a crop with sides in [min_size, max_size]."""
    crop_w = rng.randint(min(min_size, width), min(width, max_size))
    crop_h = rng.randint(min(min_size, height), min(height, max_size))
    top, left = rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)
    return left, top, left + crop_w, top + crop_h


@dataclass(frozen=True)
class DetectionAugment:
    """DETR's training recipe: flip, then either a multi-scale resize or resize-crop-resize.

    Mirrors DETR's ``make_coco_transforms('train')`` with the sizes as parameters; the chain of
    resizes and the crop is applied as a single resampling (see :func:`resample`).
    """

    scales: Sequence[int]
    max_size: int
    crop_prob: float = 0.5
    crop_resize_scales: Sequence[int] = (400, 500, 600)
    crop_min_size: int = 384
    crop_max_size: int = 600
    flip_prob: float = 0.5

    def __call__(self, image: Image.Image, target: Target, rng: random.Random) -> tuple:
        # The flip is applied to the target now and to the pixels in the one resampling below.
        flip = rng.random() < self.flip_prob
        if flip:
            target = hflip_target(target, image.width)
        region = (0.0, 0.0, float(image.width), float(image.height))
        if rng.random() < self.crop_prob:
            # Resize -> crop -> resize, composed into one crop region of the original image.
            size = rng.choice(list(self.crop_resize_scales))
            mid_w, mid_h = scaled_size(image.width, image.height, size, None)
            x0, y0, x1, y1 = random_size_crop_region(
                mid_w, mid_h, self.crop_min_size, self.crop_max_size, rng
            )
            sx, sy = image.width / mid_w, image.height / mid_h
            region = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            crop_w, crop_h = x1 - x0, y1 - y0
        else:
            crop_w, crop_h = image.width, image.height
        out_w, out_h = scaled_size(crop_w, crop_h, rng.choice(list(self.scales)), self.max_size)
        pixels, shown = resample_image(image, region, out_w, out_h, flip)
        return pixels, resample_target(target, shown, out_w, out_h)


@dataclass(frozen=True)
class DetectionEval:
    """Evaluation: a fixed resize of the shorter side (no randomness)."""

    size: int
    max_size: int

    def __call__(
        self, image: Image.Image, target: Target, rng: random.Random | None = None
    ) -> tuple:
        return resize(image, target, self.size, self.max_size)


_MEAN_255 = np.array(IMAGENET_MEAN, np.float32) * 255
_INV_STD_255 = 1 / (np.array(IMAGENET_STD, np.float32) * 255)


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> (3, H, W) float32 normalised with the ImageNet mean and std (numpy inside)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    normalised = (pixels - _MEAN_255) * _INV_STD_255
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def image_to_uint8(image: Image.Image) -> Tensor:
    """PIL RGB -> (3, H, W) uint8, a channels-first VIEW of the pixels (collate makes the copy)."""
    pixels = np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def normalize_images(images: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """(B, 3, H, W) uint8 RGB (any device) -> float32 normalised with the ImageNet mean and std.

    Padded pixels (``padding_mask`` (B, H, W) True) become 0, the mean colour, as the loaders
    padded normalised images before. Float input is taken as already normalised and returned.
    """
    if images.is_floating_point():
        return images
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).mul(255).view(1, 3, 1, 1)
    inv_std = torch.tensor(IMAGENET_STD, device=images.device).mul(255).reciprocal().view(1, 3, 1, 1)
    out = (images.float() - mean) * inv_std
    if padding_mask is not None:
        out = out.masked_fill(padding_mask.to(images.device).unsqueeze(1), 0.0)
    return out


def to_model_inputs(image: Tensor | Image.Image, target: Target) -> tuple[Tensor, Target]:
    """Final step: uint8 image tensor (3, H, W) and boxes as cx, cy, w, h in [0, 1] of the image.

    (The same conversion as ``pipeline.boxes.box_xyxy_to_cxcywh``, in numpy: see _sample_masks.)
    """
    if isinstance(image, Image.Image):
        image = image_to_uint8(image)
    height, width = image.shape[1:]
    x0, y0, x1, y1 = target["boxes"].numpy().reshape(-1, 4).T
    boxes = np.stack(
        [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], 1
    )
    boxes = torch.from_numpy(boxes.clip(0, 1).astype(np.float32).reshape(-1, 4))
    return image, dict(target, boxes=boxes)


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

    def draw(
        self, width: int, height: int, rng: random.Random
    ) -> tuple[tuple[int, int, int, int], bool]:
        """(crop box, flip) of one sample: every rng draw of __call__, in its order, so that
        decoding on the training device (pipeline.data.device_decode) crops what this would."""
        box = self.crop_box(width, height, rng)
        return box, rng.random() < self.flip_prob

    def __call__(self, image: Image.Image, rng: random.Random) -> Tensor:
        """-> (3, size, size) uint8."""
        box, flip = self.draw(image.width, image.height, rng)
        pixels = resample_image(image, box, self.size, self.size)[0]
        return pixels.flip(-1) if flip else pixels


@dataclass(frozen=True)
class ClassificationEval:
    """Resize the shorter side to ``size / crop_fraction``, then centre-crop ``size``."""

    size: int
    crop_fraction: float = 0.875

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        """-> (3, size, size) uint8; the resize and the centre crop as one resampling."""
        width, height = scaled_size(
            image.width, image.height, int(round(self.size / self.crop_fraction)), None
        )
        left, top = (width - self.size) // 2, (height - self.size) // 2
        sx, sy = image.width / width, image.height / height
        region = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return resample_image(image, region, self.size, self.size)[0]
