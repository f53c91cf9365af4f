"""Procedural scenes for the generated sample sets: shapes and textures drawn with numpy + PIL.

Every function takes a ``numpy.random.Generator`` and is a pure function of it, so a scene is
fixed by its seed. Scenes come with a segment map (H, W) int32: every pixel belongs to exactly
one segment (a stuff region or the visible part of an object), so instance masks respect
occlusion and a panoptic view exists by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Array = np.ndarray


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> Array:
    """(h, w) float32 in [0, 1]: random values on a ``cells`` grid, bilinearly upsampled."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255


def stripes(h: int, w: int, period: float, angle: float, phase: float = 0.0) -> Array:
    """(h, w) float32 square wave in {0, 1} with the given period (pixels) and angle (radians)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase
    return (np.floor(t) % 2).astype(np.float32)


def checker(h: int, w: int, period: float, phase: float = 0.0) -> Array:
    """(h, w) float32 checkerboard in {0, 1}."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ((np.floor(xs / period + phase) + np.floor(ys / period + phase)) % 2).astype(np.float32)


def blend(color_a: Array, color_b: Array, weight: Array) -> Array:
    """(h, w, 3) image mixing two RGB colours by a (h, w) weight in [0, 1]."""
    return color_a[None, None] * (1 - weight[..., None]) + color_b[None, None] * weight[..., None]


def random_color(rng: np.random.Generator, low: float = 0, high: float = 255) -> Array:
    """(3,) float32 RGB colour with channels uniform in [low, high]."""
    return rng.uniform(low, high, size=3).astype(np.float32)


def shape_mask(h: int, w: int, draw_fn) -> Array:
    """(h, w) bool mask of what ``draw_fn(ImageDraw)`` paints with fill 255."""
    canvas = Image.new("L", (w, h), 0)
    draw_fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 127


def regular_polygon(cx: float, cy: float, radius: float, sides: int, rotation: float) -> list:
    """Vertices [(x, y)] of a regular polygon."""
    angles = rotation + np.arange(sides) * 2 * np.pi / sides
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]


def star_polygon(cx: float, cy: float, radius: float, rotation: float, points: int = 5) -> list:
    """Vertices of a star with ``points`` tips and inner radius 0.45 * radius."""
    angles = rotation + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, radius, 0.45 * radius)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]


def rotated_rect(cx: float, cy: float, length: float, width: float, angle: float) -> list:
    """Corners of a rectangle centred at (cx, cy), ``length`` along ``angle``."""
    ux, uy = np.cos(angle), np.sin(angle)
    vx, vy = -uy, ux
    half_l, half_w = length / 2, width / 2
    return [
        (cx + sx * half_l * ux + sy * half_w * vx, cy + sx * half_l * uy + sy * half_w * vy)
        for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))
    ]


@dataclass
class Scene:
    """An image under construction with its segment map.

    ``segments`` (H, W) int32: 0 = unassigned, otherwise the id of the segment that owns the
    pixel; ``segment_categories`` maps segment id -> category id.
    """

    image: Array
    segments: Array
    segment_categories: dict[int, int]

    @classmethod
    def empty(cls, h: int, w: int) -> Scene:
        return cls(np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.int32), {})

    def paint(self, mask: Array, pixels: Array, category_id: int | None) -> None:
        """Paint (H, W, 3) ``pixels`` where ``mask``; a category makes it a new segment.

        ``category_id=None`` paints clutter: it takes the pixels from the segments below but,
        being unannotated, it gives them to no segment (they stay with the one under it).
        """
        self.image[mask] = pixels[mask]
        if category_id is not None:
            segment_id = len(self.segment_categories) + 1
            self.segments[mask] = segment_id
            self.segment_categories[segment_id] = category_id

    def to_uint8(self, rng: np.random.Generator, noise: float) -> Array:
        """(H, W, 3) uint8 image with Gaussian sensor noise of std ``noise``."""
        noisy = self.image + rng.normal(0, noise, self.image.shape).astype(np.float32)
        return np.clip(noisy, 0, 255).astype(np.uint8)
