"""Images in (paths, PIL images, uint8 arrays, encoded bytes) -> the model's padded batch.

The resize is the recipe's evaluation resize (``DetectionEval``) and the batch is built by the
training code's own ``collate_detection``, so an image seen by ``Predictor`` reaches the model
exactly as the stage's evaluation fed it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.collate import collate_detection
from pipeline.data.transforms import DetectionEval, image_to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ImageInput = str | Path | Image.Image | np.ndarray | bytes


class ImageDecodeError(ValueError):
    """An input image cannot be read or decoded."""


def _decode_bytes(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # convert() loads fully, so truncation shows here
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ImageDecodeError(f"{name}: not a decodable image ({err}); pass a JPEG or PNG") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageDecodeError(f"array input must be uint8 (H, W) or (H, W, 3|4), got {array.dtype} "
                               f"{tuple(array.shape)}")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).convert("RGB")


def load_image(item: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, a uint8 array or encoded bytes."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        return _from_array(item)
    if isinstance(item, (bytes, bytearray)):
        return _decode_bytes(bytes(item), "image bytes")
    path = Path(item)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such image file")
    return _decode_bytes(path.read_bytes(), str(path))


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
    """RGB images of any sizes -> {"images" (B, 3, H, W) normalised, "padding_mask" (B, H, W),
    "sizes" (B, 2) (h, w) after the resize, "orig_sizes" (B, 2) (h, w) as given}."""
    resize = DetectionEval(eval_size, max_size)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    samples, orig = [], []
    for image in images:
        resized, _ = resize(image, dict(empty))
        samples.append((image_to_tensor(resized), {}))
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
