"""Images in (paths, PIL images, uint8 arrays, encoded bytes) -> the model's padded batch.

Encoded images (paths, bytes) are opened lazily, as the loaders do, so the evaluation resize
(``DetectionEval``) decodes a JPEG at the same reduced DCT scale; the uint8 batch is built by the
loaders' own ``collate_detection``. An image seen by ``Predictor`` thus reaches the model exactly
as the stage's evaluation fed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.collate import collate_detection
from pipeline.data.decoding import open_image
from pipeline.data.errors import SkipSample
from pipeline.data.transforms import DetectionEval, to_model_inputs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ImageInput = str | Path | Image.Image | np.ndarray | bytes


class ImageDecodeError(ValueError):
    """An input image cannot be read or decoded."""


def _open_bytes(data: bytes, name: str) -> Image.Image:
    """Header read only: the resize decodes it (at a reduced scale for large JPEGs)."""
    try:
        return open_image(data, name)
    except SkipSample:
        raise ImageDecodeError(f"{name}: not a decodable image; pass a JPEG or PNG") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageDecodeError(f"array input must be uint8 (H, W) or (H, W, 3|4), got {array.dtype} "
                               f"{tuple(array.shape)}")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).convert("RGB")


def load_image(item: ImageInput) -> Image.Image:
    """A PIL image from a path, a PIL image, a uint8 array or encoded bytes (encoded ones are
    opened, not yet decoded: a truncated file fails in ``prepare_batch``)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return _from_array(item)
    if isinstance(item, (bytes, bytearray)):
        return _open_bytes(bytes(item), "image bytes")
    path = Path(item)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such image file")
    return _open_bytes(path.read_bytes(), str(path))


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, not recursive)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            raise ImageDecodeError(f"{path}: no such image file or folder")
    return found


def prepare_batch(images: Sequence[Image.Image], eval_size: int, max_size: int,
                  size_divisibility: int = 1) -> dict:
    """Images of any sizes -> {"images" (B, 3, H, W) uint8 (normalise with ``model_images``),
    "padding_mask" (B, H, W), "sizes" (B, 2) (h, w) after the resize, "orig_sizes" (B, 2)}."""
    resize = DetectionEval(eval_size, max_size)
    samples, orig = [], []
    for image in images:
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        try:
            resized, target = resize(image, empty)
        except SkipSample as skip:
            name = getattr(image, "filename", "") or "image"
            raise ImageDecodeError(f"{name}: not a decodable image ({skip.detail})") from None
        samples.append(to_model_inputs(resized, target))
        orig.append((image.height, image.width))
    batch = collate_detection(samples, size_divisibility=size_divisibility)
    sizes = torch.tensor([list(tensor.shape[1:]) for tensor, _ in samples], dtype=torch.int64)
    return {"images": batch["images"], "padding_mask": batch["padding_mask"], "sizes": sizes,
            "orig_sizes": torch.tensor(orig, dtype=torch.int64)}


def draw_prediction(image: Image.Image, boxes: Sequence[Sequence[float]], captions: Sequence[str],
                    path: str | Path) -> Path:
    """Save the image as given with each box (x0, y0, x1, y1 pixels) and its caption drawn."""
    from PIL import ImageDraw

    picture = image.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    for box, caption in zip(boxes, captions):
        draw.rectangle([float(v) for v in box], outline=(255, 40, 40), width=2)
        draw.text((float(box[0]) + 2, float(box[1]) + 1), caption, fill=(255, 255, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
