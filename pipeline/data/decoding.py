"""Decoding raw shard samples: JPEG bytes -> PIL image, COCO json -> a detection target.

The loaders open an image lazily (:func:`open_image`: header only) and decode it once the
transform knows which region it needs at which output size (:func:`decode_region`): JPEG's DCT
can decode at 1/2, 1/4 or 1/8 scale for a fraction of the full cost (libjpeg's draft mode),
which is most of a loader's time when the output is much smaller than the stored image.

Problems with a whole sample raise :class:`SkipSample` (the loaders count and skip it);
problems with one annotation drop that annotation and are counted in the given counter.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.errors import SkipSample


def decode_jpeg(data: bytes | None, key: str) -> Image.Image:
    """JPEG (or any PIL-readable) bytes -> RGB image; SkipSample("corrupt_image") if unreadable."""
    if data is None:
        raise SkipSample("incomplete_sample", f"{key}: no image member")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # convert() loads fully, so truncation shows here
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exn:
        raise SkipSample("corrupt_image", f"{key}: {exn}") from exn


def open_image(data: bytes | None, key: str) -> Image.Image:
    """Image bytes -> a PIL image with only its header read (size known, pixels not decoded)."""
    if data is None:
        raise SkipSample("incomplete_sample", f"{key}: no image member")
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exn:
        raise SkipSample("corrupt_image", f"{key}: {exn}") from exn


def draft_scale(region: tuple[float, float, float, float], out_w: int, out_h: int) -> int:
    """The largest DCT reduction (1, 2, 4, 8) that keeps ``region`` >= ``out_w`` x ``out_h`` pixels."""
    x0, y0, x1, y1 = region
    reduce = min((x1 - x0) / max(out_w, 1), (y1 - y0) / max(out_h, 1))
    return next(s for s in (8, 4, 2, 1) if s <= reduce or s == 1)


def decode_region(
    image: Image.Image, region: tuple[float, float, float, float], out_w: int, out_h: int
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Decode ``image`` (lazy or loaded) to RGB at the reduced DCT scale that ``region`` allows.

    ``region`` is (x0, y0, x1, y1) in pixels of the full-size image, to be resampled to
    (out_w, out_h). Returns the RGB image and the same region in ITS pixels (divided by the
    scale libjpeg applied: drafted pixel i covers full-size pixels [i*s, (i+1)*s)). Images that
    are not unloaded JPEGs are decoded at full size. SkipSample("corrupt_image") if unreadable.
    """
    scale = 1.0
    wanted = draft_scale(region, out_w, out_h)
    unloaded = bool(getattr(image, "tile", None))  # a lazily opened file still has its tiles
    if wanted > 1 and unloaded and image.format == "JPEG":
        width, height = image.size
        drafted = image.draft("RGB", (max(1, width // wanted), max(1, height // wanted)))
        if drafted is not None:
            scale = width / drafted[1][2]
    try:
        if unloaded:
            image.load()  # decodes fully, so truncation shows here
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # no copy when RGB already
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exn:
        raise SkipSample("corrupt_image", str(exn)) from exn
    return rgb, tuple(float(v) / scale for v in region)


def decode_json(data: bytes | None, key: str) -> dict:
    """A detection sample's json member -> {"image": ..., "annotations": [...]}."""
    if data is None:
        raise SkipSample("incomplete_sample", f"{key}: no json member")
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise SkipSample("corrupt_json", f"{key}: {exn}") from exn
    if not isinstance(record, dict) or not isinstance(record.get("image"), dict):
        raise SkipSample("corrupt_json", f"{key}: no 'image' record")
    return record


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygons, compressed or uncompressed RLE -> (height, width) bool mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]  # pycocotools needs >= 3 points
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation, counts=segmentation["counts"].encode("ascii"))
    return mask_utils.decode(rle).astype(bool)


def _clip_box(bbox, width: int, height: int) -> list[float] | None:
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def coco_target(
    record: dict,
    image_size: tuple[int, int],
    label_of: dict[int, int],
    with_masks: bool,
    dropped: Counter,
) -> dict:
    """A shard's COCO record -> target with xyxy pixel boxes (the transforms' input format).

    Crowd annotations are left out (as DETR does for its training targets); unknown
    categories and degenerate boxes are dropped and counted in ``dropped``.
    """
    width, height = image_size
    image = record["image"]
    if (image.get("width"), image.get("height")) != (width, height):
        detail = f"json {image.get('width')}x{image.get('height')}, jpeg {width}x{height}"
        raise SkipSample("size_mismatch", f"image {image.get('id')}: {detail}")
    boxes, labels, areas, masks = [], [], [], []
    for ann in record.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        if ann.get("category_id") not in label_of:
            dropped["unknown_category"] += 1
            continue
        box = _clip_box(ann.get("bbox"), width, height)
        if box is None:
            dropped["degenerate_box"] += 1
            continue
        boxes.append(box)
        labels.append(label_of[ann["category_id"]])
        areas.append(float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
        if with_masks:
            masks.append(decode_segmentation(ann.get("segmentation", []), height, width))
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "area": torch.tensor(areas, dtype=torch.float32),
        "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        "image_id": int(image.get("id", -1)),
        "orig_size": torch.tensor([height, width]),
        "size": torch.tensor([height, width]),
    }
    if with_masks:
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        target["masks"] = torch.from_numpy(stacked)
    return target
