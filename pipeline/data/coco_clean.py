"""Validate and clean a COCO instances dict: every unusable record is reported, never guessed at.

One owner for "what counts as a usable COCO record", shared by the shard converter (which skips
what is reported here and writes the cleaned file that evaluation reads) and the data-set doctor
(which counts the same problems before anything is converted). Rules:

- categories: a dict with an int ``id``; a repeated id keeps the first record;
- images: a dict with int ``id``, str ``file_name``, positive int ``width``/``height``; an id
  listed twice with the same record keeps one copy, with different records (the shard keys would
  collide and its annotations could belong to either) drops every copy and their annotations;
- annotations: a dict with an int ``id`` not seen before, an ``image_id`` of a kept image, a known
  ``category_id``, ``iscrowd`` 0/1, a ``bbox`` of 4 finite numbers that is not empty once clipped
  to the image, and a segmentation that pycocotools can decode safely (polygons of >= 3 points
  with an even number of coordinates; RLE whose ``size`` is the image's and whose counts sum to
  exactly height x width, since pycocotools writes past its buffer when they sum to more).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.errors import ConversionError

# Top-level keys rebuilt by the cleaner; any other (info, licenses, ...) is kept as it is.
_REBUILT_KEYS = ("images", "annotations", "categories")


@dataclass(frozen=True)
class SkippedItem:
    """One image or annotation left out, with the file it came from and why."""

    file: str
    reason: str
    detail: str = ""


@dataclass
class CleanCoco:
    """The usable part of a COCO dict and a report of everything left out."""

    # Category records with unique int ids, sorted by id.
    categories: list[dict]
    # Valid image records with unique ids, sorted by id.
    images: list[dict]
    # image id -> its kept annotations (bbox clipped to the image, iscrowd int, area filled in).
    annotations: dict[int, list[dict]]
    skipped: list[SkippedItem] = field(default_factory=list)
    boxes_clipped: int = 0
    # Top-level keys other than images/annotations/categories, kept in the cleaned file.
    extra: dict = field(default_factory=dict)

    def to_coco(self, image_ids: set[int] | None = None) -> dict:
        """The cleaned COCO dict, restricted to ``image_ids`` (e.g. the images a converter wrote)."""
        images = [im for im in self.images if image_ids is None or im["id"] in image_ids]
        annotations = [ann for im in images for ann in self.annotations.get(im["id"], [])]
        return {
            **self.extra,
            "images": images,
            "annotations": annotations,
            "categories": self.categories,
        }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def valid_image_record(image) -> bool:
    """A dict with int id, str file_name and positive int width and height."""
    return (
        isinstance(image, dict)
        and _is_int(image.get("id"))
        and isinstance(image.get("file_name"), str)
        and all(_is_int(image.get(k)) and image[k] > 0 for k in ("width", "height"))
    )


def clean_bbox(bbox, width: int, height: int) -> tuple[list[float] | None, bool]:
    """Clip a COCO ``[x, y, w, h]`` box to the image -> (box or None if degenerate, was_clipped)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, False
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, False
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None, False
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return [x, y, w, h], False  # inside: keep the exact numbers (x + w - x may not be w)
    return [x0, y0, x1 - x0, y1 - y0], True


def rle_string_counts(text: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' LEB128-like format).

    Each count is stored in 5-bit groups as chars offset by 48, bit 0x20 = more groups follow,
    bit 0x10 of the last group = negative; from the third count on, counts are deltas to the
    count two places back. ValueError for a string that is not in that format.
    """
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError("RLE string ends inside a count")
            char = ord(text[pos]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"RLE string has an invalid character {text[pos]!r}")
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _polygons_problem(polygons: list) -> str | None:
    for poly in polygons:
        if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
            return "polygon is not a list of finite numbers"
        if len(poly) % 2:
            return f"polygon has an odd number of coordinates ({len(poly)})"
        if len(poly) < 6:
            return f"polygon has {len(poly) // 2} points (needs >= 3)"
    return None


def _rle_problem(rle: dict, width: int, height: int) -> str | None:
    size, counts = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or size != [height, width]:
        return f"RLE size {size} is not the image's [height, width] [{height}, {width}]"
    if isinstance(counts, list):
        if not all(_is_int(c) for c in counts):
            return "RLE counts are not all integers"
    elif isinstance(counts, str):
        try:
            counts = rle_string_counts(counts)
        except ValueError as exn:
            return str(exn)
    else:
        return f"RLE counts of type {type(counts).__name__}"
    if any(c < 0 for c in counts):
        return "RLE has a negative count"
    if sum(counts) != width * height:
        return f"RLE counts sum to {sum(counts)}, the image has height x width = {width * height}"
    return None


def segmentation_problem(segmentation, width: int, height: int) -> str | None:
    """Why pycocotools could not decode ``segmentation`` safely for this image, or None if it can
    (a missing or empty segmentation is fine: a box-only annotation)."""
    if segmentation is None or segmentation == []:
        return None
    if isinstance(segmentation, list):
        return _polygons_problem(segmentation)
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, width, height)
    return f"segmentation of type {type(segmentation).__name__}"


def _clean_categories(records: list, source: str, skipped: list) -> list[dict]:
    kept: dict[int, dict] = {}
    for cat in records:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            skipped.append(SkippedItem(source, "invalid_category", str(cat)[:200]))
        elif cat["id"] in kept:
            skipped.append(SkippedItem(source, "duplicate_category_id", f"category {cat['id']}"))
        else:
            kept[cat["id"]] = cat
    return [kept[i] for i in sorted(kept)]


def _clean_images(records: list, source: str, skipped: list) -> tuple[list[dict], set[int]]:
    """-> (kept images sorted by id, ids listed with conflicting records)."""
    by_id: dict[int, list[dict]] = {}
    for image in records:
        if valid_image_record(image):
            by_id.setdefault(image["id"], []).append(image)
        else:
            skipped.append(SkippedItem(source, "invalid_image_record", str(image)[:200]))
    kept, ambiguous = [], set()
    for image_id in sorted(by_id):
        first, *others = by_id[image_id]
        if all(other == first for other in others):
            kept.append(first)
            detail = f"image {image_id} listed {len(others) + 1} times with the same record"
            skipped += [SkippedItem(source, "duplicate_image_id", detail) for _ in others]
            continue
        ambiguous.add(image_id)
        names = sorted({im["file_name"] for im in by_id[image_id]})
        detail = f"image id {image_id} names different records {names[:3]}; all dropped"
        skipped += [SkippedItem(source, "duplicate_image_id", detail) for _ in by_id[image_id]]
    return kept, ambiguous


def _annotation_problem(ann, images: dict, ambiguous: set, category_ids: set) -> tuple | None:
    """(reason, detail) if this annotation is unusable; bbox and segmentation are checked later."""
    if not isinstance(ann, dict):
        return "invalid_annotation", f"not an object: {str(ann)[:100]}"
    where = f"annotation {ann.get('id')!r} of image {ann.get('image_id')!r}"
    if not _is_int(ann.get("id")):
        return "invalid_annotation", f"{where}: id is not an integer"
    if ann.get("image_id") in ambiguous:
        return "duplicate_image_id", f"{where}: its image id names several records"
    if not _is_int(ann.get("image_id")) or ann["image_id"] not in images:
        return "dangling_image_id", f"{where}: no valid image with that id is listed"
    if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), float):
        return "invalid_annotation", f"{where}: iscrowd {ann.get('iscrowd')!r} is not 0 or 1"
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
        return "unknown_category", f"{where}: category_id {ann.get('category_id')!r}"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "invalid_bbox", f"{where}: bbox {str(bbox)[:100]} is not 4 finite numbers"
    return None


def _clean_annotation(ann: dict, image: dict) -> tuple[dict | None, bool, tuple | None]:
    """-> (cleaned annotation or None, box was clipped, (reason, detail) if dropped)."""
    where = f"annotation {ann['id']} of image {image['id']}"
    box, clipped = clean_bbox(ann["bbox"], image["width"], image["height"])
    if box is None:
        return None, False, ("degenerate_box", f"{where}: {ann['bbox']}")
    problem = segmentation_problem(ann.get("segmentation"), image["width"], image["height"])
    if problem is not None:
        return None, False, ("invalid_segmentation", f"{where}: {problem}")
    area = ann.get("area")
    if not _is_number(area) or area < 0:
        area = box[2] * box[3]  # pycocotools' area ranges need one
    return {**ann, "bbox": box, "iscrowd": int(ann.get("iscrowd", 0)), "area": area}, clipped, None


def _list_of(coco: dict, key: str, source: str) -> list:
    value = coco.get(key, [])
    if not isinstance(value, list):
        raise ConversionError(f"{source}: '{key}' is a {type(value).__name__}, not a list")
    return value


def clean_coco(coco: dict, source: str) -> CleanCoco:
    """Split a loaded COCO instances dict into its usable records and the skipped ones.

    ``source`` (the json's path) is the file named in every :class:`SkippedItem`.
    """
    skipped: list[SkippedItem] = []
    categories = _clean_categories(_list_of(coco, "categories", source), source, skipped)
    images, ambiguous = _clean_images(_list_of(coco, "images", source), source, skipped)
    by_id = {image["id"]: image for image in images}
    category_ids = {c["id"] for c in categories}
    result = CleanCoco(categories, images, {}, skipped)
    result.extra = {k: v for k, v in coco.items() if k not in _REBUILT_KEYS}
    seen: set[int] = set()
    for ann in _list_of(coco, "annotations", source):
        problem = _annotation_problem(ann, by_id, ambiguous, category_ids)
        if problem is None and ann["id"] in seen:
            problem = "duplicate_annotation_id", f"annotation id {ann['id']} listed again"
        if problem is None:
            seen.add(ann["id"])
            kept, clipped, problem = _clean_annotation(ann, by_id[ann["image_id"]])
        if problem is not None:
            skipped.append(SkippedItem(source, *problem))
            continue
        result.boxes_clipped += int(clipped)
        result.annotations.setdefault(ann["image_id"], []).append(kept)
    return result


def load_coco_json(path: str | Path) -> dict:
    """Read a COCO json file -> dict; ConversionError naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"annotation file {path} not found")
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ConversionError(f"{path} is not valid JSON: {exn}") from exn
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise ConversionError(f"{path} has no 'images' list; is it a COCO instances file?")
    return coco
