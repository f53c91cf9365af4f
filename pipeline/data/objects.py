"""The classification set: object-centric images of the things the detection scenes contain.

It is to the generated detection set what ImageNet is to COCO: one object per image, drawn by
the detection scenes' own shape and texture functions (:mod:`pipeline.data.synthetic`), on the
same kinds of backgrounds (sky / ground / water, or a random two-colour field), with the same
unannotated clutter, plus what object-centric photos have: scale, position, rotation and colour
jitter, an occluder over part of the object and smaller distractor objects around it.

There are more classes than detection has: each detection thing is split into finer kinds by
texture or shape variant (a striped ball, a thin ring), and six kinds never annotated in the
detection set are added. Colours are random per image, so colour alone tells nothing; shape and
texture decide the class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data import scenes, synthetic
from pipeline.data.scenes import Scene


@dataclass(frozen=True)
class ObjectKind:
    """One class: a shape (a detection shape or an extra one) and a texture."""

    name: str
    shape: str  # synthetic.shape_at's shapes, or one of EXTRA_SHAPES
    texture: str  # "plain", "checker" or "stripes" (synthetic.texture_pixels)
    width: float = 0.4  # ring width as a fraction of the radius (synthetic.shape_at)


EXTRA_SHAPES = ("beads", "cross", "hexagon", "crescent", "oval", "sparkle")

OBJECT_KINDS = (
    ObjectKind("ball_plain", "disc", "plain"),
    ObjectKind("ball_striped", "disc", "stripes"),
    ObjectKind("ball_checkered", "disc", "checker"),
    ObjectKind("box_checkered", "square", "checker"),
    ObjectKind("box_plain", "square", "plain"),
    ObjectKind("box_striped", "square", "stripes"),
    ObjectKind("tent_striped", "tent", "stripes"),
    ObjectKind("tent_plain", "tent", "plain"),
    ObjectKind("star_plain", "star", "plain"),
    ObjectKind("star_striped", "star", "stripes"),
    ObjectKind("ring_thin", "ring", "plain", width=0.22),
    ObjectKind("ring_thick", "ring", "plain", width=0.55),
    ObjectKind("pole_striped", "pole", "stripes"),
    ObjectKind("pole_plain", "pole", "plain"),
    ObjectKind("beads", "beads", "plain"),
    ObjectKind("cross", "cross", "plain"),
    ObjectKind("hexagon", "hexagon", "plain"),
    ObjectKind("crescent", "crescent", "plain"),
    ObjectKind("oval", "oval", "plain"),
    ObjectKind("sparkle", "sparkle", "plain"),
)
CLASSIFY_CLASSES = tuple(kind.name for kind in OBJECT_KINDS)


def _extra_shape(
    rng: np.random.Generator, shape: str, centre: tuple[float, float], r: float, rot: float,
    hw: tuple[int, int],
) -> np.ndarray:
    """(h, w) bool mask of a kind the detection set never annotates."""
    (cx, cy), (h, w) = centre, hw
    if shape == "beads":  # a handful of detection-sized beads around the centre
        points = [(cx + rng.normal(0, 0.45 * r), cy + rng.normal(0, 0.45 * r))
                  for _ in range(int(rng.integers(4, 9)))]  # fmt: skip
        radius = max(1.5, 0.16 * r)
        return scenes.shape_mask(h, w, lambda d: [
            d.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255) for x, y in points
        ])  # fmt: skip
    if shape == "cross":
        arms = [scenes.rotated_rect(cx, cy, 2 * r, 0.5 * r, rot + a) for a in (0, np.pi / 2)]
        return scenes.shape_mask(h, w, lambda d: [d.polygon(arm, fill=255) for arm in arms])
    if shape == "hexagon":
        hexagon = scenes.regular_polygon(cx, cy, r, 6, rot)
        return scenes.shape_mask(h, w, lambda d: d.polygon(hexagon, fill=255))
    if shape == "crescent":
        disc = synthetic.shape_at(rng, "disc", centre, r, rot, hw)
        shift = (cx + 0.45 * r * np.cos(rot), cy + 0.45 * r * np.sin(rot))
        return disc & ~synthetic.shape_at(rng, "disc", shift, 0.85 * r, rot, hw)
    if shape == "oval":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        xs, ys = r * np.cos(t), 0.5 * r * np.sin(t)
        outline = [(cx + x * np.cos(rot) - y * np.sin(rot), cy + x * np.sin(rot) + y * np.cos(rot))
                   for x, y in zip(xs, ys)]  # fmt: skip
        return scenes.shape_mask(h, w, lambda d: d.polygon(outline, fill=255))
    sparkle = scenes.star_polygon(cx, cy, r, rot, points=4)
    return scenes.shape_mask(h, w, lambda d: d.polygon(sparkle, fill=255))


def object_mask(
    rng: np.random.Generator, kind: ObjectKind, centre: tuple[float, float], r: float,
    hw: tuple[int, int],
) -> np.ndarray:
    """(h, w) bool mask of ``kind`` at ``centre`` with radius ``r`` and a random angle."""
    rot = rng.uniform(0, 2 * np.pi)
    if kind.shape in EXTRA_SHAPES:
        return _extra_shape(rng, kind.shape, centre, r, rot, hw)
    # A detection pole is 2.5-5 px thick at a mean radius of 19 px: keep that proportion.
    width = 0.4 * r / 19 if kind.shape == "pole" else kind.width
    return synthetic.shape_at(rng, kind.shape, centre, r, rot, hw, width=width)


def _background(rng: np.random.Generator, scene: Scene, size: int) -> None:
    """An outdoor backdrop (the detection scenes' stuff) or a random two-colour field."""
    if rng.random() < 0.6:
        synthetic.paint_stuff(rng, scene, size, size)
    else:
        field = scenes.smooth_noise(rng, size, size, int(rng.integers(2, 8)))
        scene.image[:] = scenes.blend(scenes.random_color(rng), scenes.random_color(rng), field)


def _distractors(rng: np.random.Generator, scene: Scene, size: int, main_r: float) -> None:
    """0-2 smaller objects of any kind, away from the centre (as in a real photo's frame)."""
    for _ in range(int(rng.choice(3, p=[0.55, 0.3, 0.15]))):
        kind = OBJECT_KINDS[int(rng.integers(len(OBJECT_KINDS)))]
        angle = rng.uniform(0, 2 * np.pi)
        centre = (size / 2 + 0.45 * size * np.cos(angle), size / 2 + 0.45 * size * np.sin(angle))
        mask = object_mask(rng, kind, centre, main_r * rng.uniform(0.2, 0.4), (size, size))
        scene.paint(mask, synthetic.texture_pixels(rng, kind.texture, size, size), None)


def _occluder(rng: np.random.Generator, scene: Scene, main: np.ndarray, size: int) -> None:
    """A bar over the object's edge, only where it leaves >= 65 % of the object seen."""
    ys, xs = np.nonzero(main)
    if len(xs) == 0:
        return
    pick = int(rng.integers(len(xs)))
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.8) * size
    bar = scenes.rotated_rect(xs[pick], ys[pick], length, rng.uniform(3, 0.15 * size), angle)
    mask = scenes.shape_mask(size, size, lambda d: d.polygon(bar, fill=255))
    if (main & ~mask).sum() >= 0.65 * main.sum():
        fill = synthetic.texture_pixels(rng, str(rng.choice(["plain", "stripes"])), size, size)
        scene.paint(mask, fill, None)


def render_object_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 image of one object of class ``label`` (index into OBJECT_KINDS)."""
    kind = OBJECT_KINDS[label]
    scene = Scene.empty(size, size)
    _background(rng, scene, size)
    synthetic.paint_clutter(rng, scene, size, size, int(rng.integers(0, 5)))
    # The object fills much of the frame, as in object-centric photos (ImageNet's median object
    # covers about half the image); random resized crops then vary its scale further.
    r = rng.uniform(0.2, 0.42) * size
    centre = tuple(size / 2 + rng.uniform(-0.12, 0.12, 2) * size)
    _distractors(rng, scene, size, r)
    main = object_mask(rng, kind, centre, r, (size, size))
    scene.paint(main, synthetic.texture_pixels(rng, kind.texture, size, size), label)
    if rng.random() < 0.3:
        _occluder(rng, scene, main, size)
    scene.image *= rng.uniform(0.7, 1.2)  # exposure jitter
    return scene.to_uint8(rng, noise=float(rng.uniform(3, 9)))
