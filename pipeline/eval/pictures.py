"""Pictures of predictions on validation images: boxes with class and score, panoptic segments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.data.transforms import IMAGENET_MEAN as _MEAN
from pipeline.data.transforms import IMAGENET_STD as _STD

IMAGENET_MEAN = torch.tensor(_MEAN)[:, None, None]
IMAGENET_STD = torch.tensor(_STD)[:, None, None]


def draw_predictions(images: torch.Tensor, sizes: torch.Tensor, detections: list[dict],
                     names: list[str], folder: Path, min_score: float) -> None:
    """Save (B, 3, H, W) normalised images with their detections drawn, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, det) in enumerate(zip(images, detections)):
        h, w = (int(s) for s in sizes[i])
        pixels = ((image.float().cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1) * 255)
        picture = Image.fromarray(pixels[:, :h, :w].byte().permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(picture)
        for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
            if score < min_score:
                continue
            draw.rectangle(box.tolist(), outline=(255, 40, 40), width=2)
            draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{names[int(label)]} {score:.2f}",
                      fill=(255, 255, 0))
        picture.save(folder / f"val_{i:02d}.png")


def _palette(segment_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(segment_id)
    return tuple(int(v) for v in rng.integers(40, 256, 3))


def draw_segments(image: torch.Tensor, size: torch.Tensor, panoptic: torch.Tensor, segments: list[dict],
                  names: list[str], path: Path) -> None:
    """Save a (3, H, W) normalised image with its panoptic segments blended in and a box and
    name per thing segment, as PNG; ``panoptic`` (h0, w0) ids at any size (resized here)."""
    h, w = (int(s) for s in size)
    pixels = ((image.float().cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1) * 255)[:, :h, :w]
    picture = Image.fromarray(pixels.byte().permute(1, 2, 0).numpy())
    ids = np.asarray(Image.fromarray(panoptic.numpy().astype(np.int32)).resize((w, h), Image.NEAREST))
    colours = np.zeros((h, w, 3), np.uint8)
    for segment in segments:
        colours[ids == segment["id"]] = _palette(segment["id"])
    blended = Image.blend(picture, Image.fromarray(colours), 0.45)
    blended.paste(picture, mask=Image.fromarray(((ids == 0) * 255).astype(np.uint8)))
    draw = ImageDraw.Draw(blended)
    for segment in segments:
        ys, xs = np.nonzero(ids == segment["id"])
        if not segment["isthing"] or len(xs) == 0:
            continue
        draw.rectangle([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], outline=(255, 40, 40))
        draw.text((int(xs.min()) + 2, int(ys.min()) + 1), f"{names[segment['label']]} {segment['score']:.2f}",
                  fill=(255, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    blended.save(path)
