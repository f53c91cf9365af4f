"""The inspector's pictures: the image upscaled to a readable size with ground truth and the
top queries, and per query its box at every decoder layer, its sampling points and its mask."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

GT_COLOUR = (40, 220, 90)
QUERY_COLOUR = (255, 90, 40)
# sampling points, one colour per feature level (finest first)
LEVEL_COLOURS = [(255, 60, 60), (60, 200, 255), (255, 220, 0), (200, 80, 255), (255, 255, 255)]


def upscale(image: Image.Image, min_side: int) -> tuple[Image.Image, float]:
    """(image whose longer side is at least ``min_side``, scale factor); larger ones unchanged."""
    image = image.convert("RGB")
    factor = max(1.0, min_side / max(image.size))
    if factor == 1.0:
        return image.copy(), 1.0
    size = (round(image.width * factor), round(image.height * factor))
    return image.resize(size, Image.BICUBIC), factor


def _scaled(box, factor: float) -> list[float]:
    return [float(v) * factor for v in box]


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour) -> None:
    """Text on a dark box so it stays readable on any image."""
    left, top, right, bottom = draw.textbbox(xy, text)
    draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
    draw.text(xy, text, fill=colour)


def overview_picture(image: Image.Image, record: dict, min_side: int, top: int) -> Image.Image:
    """Ground truth (green, G<n>) and the ``top`` highest-scoring queries (orange, q<n> score)."""
    picture, factor = upscale(image, min_side)
    draw = ImageDraw.Draw(picture)
    width = max(2, round(factor))
    for row in record["ground_truth"]:
        box = _scaled(row["box"], factor)
        draw.rectangle(box, outline=GT_COLOUR, width=width)
        _label(draw, (box[0] + 2, box[3] - 12), f"G{row['object']} {row['name']}", GT_COLOUR)
    for query in sorted(record["queries"], key=lambda q: q["rank"])[:top]:
        box = _scaled(query["box"], factor)
        draw.rectangle(box, outline=QUERY_COLOUR, width=max(1, width - 1))
        _label(draw, (box[0] + 2, box[1] + 1), f"q{query['query']} {query['name']} {query['score']:.2f}",
               QUERY_COLOUR)
    return picture


def _layer_colour(layer: int, layers: int) -> tuple[int, int, int]:
    """Blue for the first decoder layer to orange for the last: how refinement moved the box."""
    t = layer / max(1, layers - 1)
    return (round(60 + 195 * t), round(120 + 20 * t), round(255 - 215 * t))


def query_picture(image: Image.Image, query: dict, record: dict, min_side: int,
                  mask: torch.Tensor | None = None, layer: int = -1) -> Image.Image:
    """One query: its mask (segmenters), its box at every layer (blue -> orange), the sampling
    points of ``layer`` (colour = level, area = attention weight) and the ground truth."""
    picture, factor = upscale(image, min_side)
    if mask is not None:
        picture = _blend_mask(picture, mask)
    draw = ImageDraw.Draw(picture)
    for row in record["ground_truth"]:
        draw.rectangle(_scaled(row["box"], factor), outline=GT_COLOUR, width=1)
    if query["points"]:
        for _head, level, x, y, weight in query["points"][layer]:
            radius = 1.5 + 12 * math.sqrt(weight)
            cx, cy = x * factor, y * factor
            colour = LEVEL_COLOURS[min(level, len(LEVEL_COLOURS) - 1)]
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=1)
    layers = query["layer_boxes"]
    for index, box in enumerate(layers):
        last = index == len(layers) - 1
        draw.rectangle(_scaled(box, factor), outline=_layer_colour(index, len(layers)),
                       width=3 if last else 1)
    box = _scaled(query["box"], factor)
    _label(draw, (box[0] + 2, box[1] + 1), f"q{query['query']} {query['name']} {query['score']:.2f}",
           QUERY_COLOUR)
    return picture


def _blend_mask(picture: Image.Image, mask: torch.Tensor) -> Image.Image:
    """Tint the (H, W) bool mask (image size) in cyan on the upscaled picture."""
    region = Image.fromarray(mask.numpy().astype(np.uint8) * 255).resize(picture.size, Image.NEAREST)
    tinted = Image.blend(picture, Image.new("RGB", picture.size, (0, 230, 255)), 0.45)
    return Image.composite(tinted, picture, region)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """Two pictures next to each other on a dark background (ground truth | predictions)."""
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)),
                       (30, 30, 30))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas
