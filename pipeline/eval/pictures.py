"""Pictures of predictions on validation images: ground truth next to the top-k predictions
with their scores (upscaled so small images stay readable), panoptic segments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.data.transforms import IMAGENET_MEAN as _MEAN
from pipeline.data.transforms import IMAGENET_STD as _STD

IMAGENET_MEAN = torch.tensor(_MEAN)[:, None, None]
IMAGENET_STD = torch.tensor(_STD)[:, None, None]


TRUTH_COLOUR, CONFIDENT_COLOUR, LOW_COLOUR = (40, 220, 90), (255, 40, 40), (255, 170, 60)


def _picture(image: torch.Tensor, size: torch.Tensor) -> Image.Image:
    """(3, H, W) normalised image cropped to its unpadded (h, w) ``size`` -> RGB picture."""
    h, w = (int(s) for s in size)
    pixels = ((image.float().cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1) * 255)
    return Image.fromarray(pixels[:, :h, :w].byte().permute(1, 2, 0).numpy())


def _boxes_drawn(picture: Image.Image, factor: float, boxes, captions, colours, widths) -> Image.Image:
    picture = picture.resize((round(picture.width * factor), round(picture.height * factor)),
                             Image.BICUBIC)
    draw = ImageDraw.Draw(picture)
    for box, caption, colour, width in zip(boxes, captions, colours, widths):
        box = [float(v) * factor for v in box]
        draw.rectangle(box, outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((box[0] + 2, box[1] + 1), caption)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
        draw.text((box[0] + 2, box[1] + 1), caption, fill=colour)
    return picture


def draw_truth_and_predictions(images: torch.Tensor, sizes: torch.Tensor, truths: list[dict],
                               detections: list[dict], names: list[str], folder: Path,
                               min_score: float, top_k: int = 10, min_side: int = 512) -> list[Path]:
    """Save, per (3, H, W) normalised image, its ground truth (left; ``truths``: {"boxes" (n, 4)
    xyxy pixels, "labels"}) next to its ``top_k`` best detections with scores (right, low scores
    included: thin orange below ``min_score``), upscaled until the longer side is ``min_side``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, truth, det) in enumerate(zip(images, truths, detections)):
        picture = _picture(image, sizes[i])
        factor = max(1.0, min_side / max(picture.size))
        gt = _boxes_drawn(picture, factor, truth["boxes"], [names[int(c)] for c in truth["labels"]],
                          [TRUTH_COLOUR] * len(truth["boxes"]), [2] * len(truth["boxes"]))
        order = det["scores"].argsort(descending=True)[:top_k].tolist()[::-1]  # best drawn last
        scores = [float(det["scores"][j]) for j in order]
        pred = _boxes_drawn(picture, factor, [det["boxes"][j] for j in order],
                            [f"{names[int(det['labels'][j])]} {s:.2f}" for j, s in zip(order, scores)],
                            [CONFIDENT_COLOUR if s >= min_score else LOW_COLOUR for s in scores],
                            [2 if s >= min_score else 1 for s in scores])
        canvas = Image.new("RGB", (gt.width * 2 + 8, gt.height), (30, 30, 30))
        canvas.paste(gt, (0, 0))
        canvas.paste(pred, (gt.width + 8, 0))
        paths.append(folder / f"val_{i:02d}.png")
        canvas.save(paths[-1])
    return paths


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
