"""Renderers of the generated detection sets: cluttered outdoor scenes and aerial scenes.

The classification set (:mod:`pipeline.data.objects`) draws its objects with the shapes,
textures and backgrounds defined here.

Each renderer is a pure function of a ``numpy.random.Generator``. Difficulty comes from random
colours (shape and texture decide the class, not colour), sizes spanning an order of magnitude,
occlusion, unannotated clutter, textured backgrounds and sensor noise.
"""

from __future__ import annotations

import numpy as np

from pipeline.data import scenes
from pipeline.data.scenes import Scene

# Thing categories of the detection set; ids have gaps on purpose, as COCO's do.
DETECT_THINGS = (
    {"id": 1, "name": "ball"}, {"id": 2, "name": "box"}, {"id": 4, "name": "tent"},
    {"id": 5, "name": "star"}, {"id": 7, "name": "ring"}, {"id": 9, "name": "bead"},
    {"id": 11, "name": "pole"},
)  # fmt: skip
DETECT_STUFF = (
    {"id": 101, "name": "sky"},
    {"id": 102, "name": "ground"},
    {"id": 103, "name": "water"},
)
# Size range (pixels, radius or half side) per thing: beads are tiny, tents are large.
_THING_SIZES = {
    1: (6, 16),
    2: (8, 24),
    4: (12, 32),
    5: (6, 18),
    7: (7, 20),
    9: (2, 4),
    11: (10, 28),
}
AERIAL_THINGS = (
    {"id": 1, "name": "car"}, {"id": 2, "name": "truck"}, {"id": 3, "name": "house"},
    {"id": 4, "name": "tree"}, {"id": 5, "name": "pool"},
)  # fmt: skip


def paint_stuff(rng: np.random.Generator, scene: Scene, h: int, w: int) -> None:
    """Sky above a horizon, ground below, and sometimes a water band at the bottom."""
    horizon = int(h * rng.uniform(0.25, 0.6))
    ys = np.arange(h)[:, None].repeat(w, 1)
    sky_img = scenes.blend(
        np.array([90, 140, 230], np.float32) + rng.normal(0, 20, 3),
        np.array([200, 220, 250], np.float32),
        np.clip(ys / max(horizon, 1), 0, 1) * 0.8,
    )
    sky_img += (scenes.smooth_noise(rng, h, w, 6)[..., None] - 0.5) * 40  # clouds
    scene.paint(ys < horizon, sky_img, 101)
    ground = scenes.random_color(rng, 60, 160) * np.array([1.0, 0.9, 0.6], np.float32)
    grain = scenes.smooth_noise(rng, h, w, 24)[..., None]
    scene.paint(ys >= horizon, ground[None, None] * (0.7 + 0.6 * grain), 102)
    if rng.random() < 0.5:
        shore = int(horizon + (h - horizon) * rng.uniform(0.4, 0.8))
        ripples = scenes.stripes(h, w, rng.uniform(3, 6), np.pi / 2 + rng.normal(0, 0.05))
        water = scenes.blend(
            np.array([30, 70, 140], np.float32), np.array([70, 120, 190], np.float32), ripples * 0.6
        )
        scene.paint(ys >= shore, water, 103)


def paint_clutter(rng: np.random.Generator, scene: Scene, h: int, w: int, count: int) -> None:
    """Unannotated blobs and strokes: belong to the stuff beneath, so detectors must ignore them."""
    for _ in range(count):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(1.5, 7)
        pts = [(x + rng.normal(0, r), y + rng.normal(0, r)) for _ in range(int(rng.integers(3, 6)))]
        mask = scenes.shape_mask(
            h, w, lambda d, p=pts: d.line(p, fill=255, width=int(rng.integers(1, 3)))
        )
        scene.paint(mask, np.broadcast_to(scenes.random_color(rng)[None, None], (h, w, 3)), None)


# The shape and the usual texture of each detection thing; the classification set draws the same
# shapes and textures (and variants of them) through the same functions.
THING_SHAPES = {1: "disc", 2: "square", 4: "tent", 5: "star", 7: "ring", 9: "disc", 11: "pole"}
THING_TEXTURES = {1: "plain", 2: "checker", 4: "stripes", 5: "plain", 7: "plain", 9: "plain",
                  11: "stripes"}  # fmt: skip


def shape_at(
    rng: np.random.Generator,
    shape: str,
    centre: tuple[float, float],
    r: float,
    rot: float,
    hw: tuple[int, int],
    width: float = 0.4,
) -> np.ndarray:
    """(h, w) bool mask of one detection-thing shape of radius ``r`` centred at ``centre``.

    ``width``: ring width as a fraction of ``r``; pole thickness is scaled by it / 0.4 (the
    detection set draws both at 0.4, which keeps its images unchanged).
    """
    (cx, cy), (h, w) = centre, hw
    if shape == "disc":
        return scenes.shape_mask(
            h, w, lambda d: d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        )
    if shape == "square":
        return scenes.shape_mask(
            h, w, lambda d: d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
        )
    if shape == "tent":
        tri = [
            (cx - r, cy + 0.6 * r),
            (cx + r, cy + 0.6 * r),
            (cx + rng.normal(0, 0.2 * r), cy - r),
        ]
        return scenes.shape_mask(h, w, lambda d: d.polygon(tri, fill=255))
    if shape == "star":
        return scenes.shape_mask(
            h, w, lambda d: d.polygon(scenes.star_polygon(cx, cy, r, rot), fill=255)
        )
    if shape == "ring":
        ring = max(2, int(width * r))
        return scenes.shape_mask(
            h, w, lambda d: d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=ring)
        )
    if shape != "pole":
        raise ValueError(f"shape_at: unknown shape {shape!r}")
    thickness = rng.uniform(2.5, 5) * (width / 0.4)
    bar = scenes.rotated_rect(cx, cy, 2 * r, thickness, np.pi / 2 + rng.normal(0, 0.3))
    return scenes.shape_mask(h, w, lambda d: d.polygon(bar, fill=255))


def thing_mask(rng: np.random.Generator, category_id: int, h: int, w: int) -> np.ndarray:
    """(h, w) bool full (unoccluded) mask of one thing at a random place, size and angle."""
    r = rng.uniform(*_THING_SIZES[category_id])
    cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(0.1 * h, 1.05 * h)
    rot = rng.uniform(0, 2 * np.pi)
    return shape_at(rng, THING_SHAPES[category_id], (cx, cy), r, rot, (h, w))


def texture_pixels(rng: np.random.Generator, texture: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) fill of a thing: two random colours mixed by a "plain" (smooth noise),
    "checker" or "stripes" pattern; colour never tells the class."""
    color_a, color_b = scenes.random_color(rng), scenes.random_color(rng)
    if texture == "checker":
        weight = scenes.checker(h, w, rng.uniform(3, 6)) * 0.7
    elif texture == "stripes":
        weight = scenes.stripes(h, w, rng.uniform(2, 5), rng.uniform(0, np.pi)) * 0.7
    else:
        weight = scenes.smooth_noise(rng, h, w, 8) * 0.3
    return scenes.blend(color_a, color_b, weight)


def _visible_instances(
    scene: Scene, drawn: list[tuple[int, int, int]], min_fraction: float
) -> list:
    """[(category_id, visible bool mask)] of things still visible enough after occlusion."""
    instances = []
    for segment_id, category_id, full_area in drawn:
        visible = scene.segments == segment_id
        area = int(visible.sum())
        if area >= max(4, min_fraction * full_area):
            instances.append((category_id, visible))
    return instances


def render_detect_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list, Scene]:
    """A cluttered outdoor scene -> (image (h, w, 3) uint8, [(category_id, mask)], scene).

    1-6 things of 7 classes spanning tiny beads to large tents, drawn back to front so later
    ones occlude earlier ones; things mostly hidden are dropped from the annotations (their
    remaining pixels still belong to their segment in the panoptic map).
    """
    scene = Scene.empty(h, w)
    paint_stuff(rng, scene, h, w)
    paint_clutter(rng, scene, h, w, int(rng.integers(2, 10)))
    drawn = []
    for _ in range(int(rng.integers(1, 7))):
        category_id = int(rng.choice([c["id"] for c in DETECT_THINGS]))
        mask = thing_mask(rng, category_id, h, w)
        if mask.sum() < 4:
            continue
        pixels = texture_pixels(rng, THING_TEXTURES[category_id], h, w)
        scene.paint(mask, pixels, category_id)
        drawn.append((len(scene.segment_categories), category_id, int(mask.sum())))
    return scene.to_uint8(rng, noise=6), _visible_instances(scene, drawn, 0.3), scene


def _aerial_background(rng: np.random.Generator, scene: Scene, size: int) -> None:
    fields = scenes.smooth_noise(rng, size, size, int(rng.integers(3, 7)))
    green, brown = np.array([70, 120, 50], np.float32), np.array([150, 125, 85], np.float32)
    scene.image[:] = scenes.blend(green, brown, (fields > 0.5) * 0.8 + fields * 0.2)
    scene.image += (scenes.smooth_noise(rng, size, size, 40)[..., None] - 0.5) * 30
    for _ in range(int(rng.integers(1, 3))):
        road = scenes.rotated_rect(
            *rng.uniform(0, size, 2), 3 * size, rng.uniform(6, 12), rng.uniform(0, np.pi)
        )
        mask = scenes.shape_mask(size, size, lambda d, p=road: d.polygon(p, fill=255))
        scene.paint(mask, np.full((size, size, 3), rng.uniform(90, 130), np.float32), None)


def _aerial_thing(
    rng: np.random.Generator, category_id: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, pixels) of one aerial object seen from above."""
    cx, cy, angle = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, np.pi)
    color = scenes.random_color(rng)
    if category_id in (1, 2):  # car, truck: small bright rectangles
        length, width = (
            (rng.uniform(5, 8), rng.uniform(3, 4))
            if category_id == 1
            else (rng.uniform(10, 15), rng.uniform(4, 5))
        )
        poly = scenes.rotated_rect(cx, cy, length, width, angle)
    elif category_id == 3:  # house: larger square with a roof ridge
        side = rng.uniform(10, 22)
        poly = scenes.rotated_rect(cx, cy, side, side * rng.uniform(0.7, 1.0), angle)
        color = rng.uniform(100, 200) * np.array([1.0, 0.55, 0.45], np.float32)
    elif category_id == 4:  # tree: dark green disc
        r = rng.uniform(3, 7)
        mask = scenes.shape_mask(
            size, size, lambda d: d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        )
        shade = scenes.smooth_noise(rng, size, size, 30)[..., None]
        return mask, np.array([30, 80, 30], np.float32) * (0.7 + 0.6 * shade)
    else:  # pool: blue-cyan rounded rectangle
        poly = scenes.rotated_rect(cx, cy, rng.uniform(6, 12), rng.uniform(4, 7), angle)
        color = np.array([60, 170, 220], np.float32) + rng.normal(0, 15, 3)
    mask = scenes.shape_mask(size, size, lambda d: d.polygon(poly, fill=255))
    ridge = scenes.stripes(size, size, 40, angle + np.pi / 2) * (0.25 if category_id == 3 else 0.0)
    return mask, scenes.blend(color, color * 0.6, ridge)


def render_aerial_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list]:
    """A top-down scene with 5-24 small objects -> (image (size, size, 3) uint8, instances)."""
    scene = Scene.empty(size, size)
    _aerial_background(rng, scene, size)
    drawn = []
    weights = np.array([0.35, 0.1, 0.2, 0.25, 0.1])
    for _ in range(int(rng.integers(5, 25))):
        category_id = int(rng.choice([c["id"] for c in AERIAL_THINGS], p=weights))
        mask, pixels = _aerial_thing(rng, category_id, size)
        if mask.sum() < 4:
            continue
        scene.paint(mask, pixels, category_id)
        drawn.append((len(scene.segment_categories), category_id, int(mask.sum())))
    return scene.to_uint8(rng, noise=5), _visible_instances(scene, drawn, 0.4)
