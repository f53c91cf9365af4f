"""Other annotation formats -> a COCO instances dict: YOLO txt folders and Pascal VOC XML.

Both return an :class:`ImportedCoco`: the COCO dict (image ids 1..N in sorted file order,
annotation ids 1..M, category ids 1..C), the folder its ``file_name`` entries are relative to,
and every line or file that could not be read, with file and reason. What the COCO dict holds is
not judged here: the data-set doctor and the shard converter check it like any COCO file.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.data.coco_clean import SkippedItem
from pipeline.data.errors import ConversionError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImportedCoco:
    """A data set read from another format, as COCO."""

    coco: dict
    # The folder the images' file_name entries are relative to.
    images_dir: Path
    skipped: list[SkippedItem] = field(default_factory=list)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, None if it is not a readable image."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _categories(names: list[str]) -> list[dict]:
    return [{"id": i + 1, "name": name} for i, name in enumerate(names)]


# ---------------------------------------------------------------- YOLO


def _yolo_names(root: Path) -> list[str]:
    """Class names from ``classes.txt`` (one per line) or a data yaml's ``names`` (list or dict)."""
    if (root / "classes.txt").is_file():
        lines = (root / "classes.txt").read_text().splitlines()
        return [line.strip() for line in lines if line.strip()]
    import yaml

    for path in sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml")):
        names = (yaml.safe_load(path.read_text()) or {}).get("names")
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names)]
        if isinstance(names, list):
            return [str(n) for n in names]
    raise ConversionError(
        f"{root} has no classes.txt and no data yaml with 'names'; add classes.txt with one "
        "class name per line (line i = class i)"
    )


def _polygon_area(xs: list[float], ys: list[float]) -> float:
    return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))


def _yolo_annotation(values: list[float], width: int, height: int) -> dict:
    """``cx cy w h`` (a box) or ``x1 y1 x2 y2 ...`` (a polygon), normalised -> COCO fields."""
    if len(values) == 4:
        cx, cy, w, h = values
        bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
        return {"bbox": bbox, "area": bbox[2] * bbox[3], "segmentation": []}
    xs, ys = [x * width for x in values[0::2]], [y * height for y in values[1::2]]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    polygon = [v for xy in zip(xs, ys) for v in xy]
    return {"bbox": bbox, "area": _polygon_area(xs, ys), "segmentation": [polygon]}


def _parse_yolo_line(line: str, num_classes: int) -> tuple[int, list[float]] | str:
    """-> (class index, normalised values) or the reason the line is unusable."""
    parts = line.split()
    try:
        cls, values = int(parts[0]), [float(v) for v in parts[1:]]
    except ValueError:
        return "not numbers"
    if not 0 <= cls < num_classes:
        return f"class {cls} is not in 0..{num_classes - 1}"
    if len(values) != 4 and (len(values) < 6 or len(values) % 2):
        return f"{len(values)} values: expected 'cx cy w h' or a polygon of >= 3 points"
    return cls, values


def yolo_to_coco(root: str | Path, split: str | None = None) -> ImportedCoco:
    """``root/images[/split]/**`` + ``root/labels[/split]/**.txt`` (YOLO) -> COCO.

    A label line is ``class cx cy w h`` or ``class x1 y1 x2 y2 ...`` (a polygon), all normalised
    to [0, 1]; class i is line i of ``classes.txt`` (or ``names`` in the data yaml) and becomes
    category id i + 1. An image without a label file has no objects (as in YOLO).
    """
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labels"
    if split:
        images_dir, labels_dir = images_dir / split, labels_dir / split
    if not images_dir.is_dir():
        raise ConversionError(f"{images_dir} not found; expected YOLO_DIR/images[/SPLIT] beside "
                              "YOLO_DIR/labels[/SPLIT]")  # fmt: skip
    names = _yolo_names(root)
    result = ImportedCoco({"images": [], "annotations": [], "categories": _categories(names)},
                          images_dir)  # fmt: skip
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in files:
        _add_yolo_image(result, path, labels_dir, len(names))
    stems = {p.relative_to(images_dir).with_suffix("").as_posix() for p in files}
    for label in sorted(labels_dir.rglob("*.txt")) if labels_dir.is_dir() else []:
        if label.relative_to(labels_dir).with_suffix("").as_posix() not in stems:
            result.skipped.append(SkippedItem(str(label), "label_without_image"))
    return result


def _add_yolo_image(result: ImportedCoco, path: Path, labels_dir: Path, num_classes: int) -> None:
    size = _image_size(path)
    if size is None:
        result.skipped.append(SkippedItem(str(path), "unreadable_image"))
        return
    rel = path.relative_to(result.images_dir)
    image_id = len(result.coco["images"]) + 1
    result.coco["images"].append(
        {"id": image_id, "file_name": rel.as_posix(), "width": size[0], "height": size[1]}
    )
    label = (labels_dir / rel).with_suffix(".txt")
    lines = label.read_text().splitlines() if label.is_file() else []
    annotations = result.coco["annotations"]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parsed = _parse_yolo_line(line, num_classes)
        if isinstance(parsed, str):
            result.skipped.append(SkippedItem(f"{label}:{number}", "invalid_label_line", parsed))
            continue
        fields = _yolo_annotation(parsed[1], *size)
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": parsed[0] + 1, "iscrowd": 0, **fields})  # fmt: skip


# ---------------------------------------------------------------- Pascal VOC


def _xml_number(node: ET.Element | None, tag: str) -> float:
    """A numeric child's value; ValueError if absent or not a number."""
    text = None if node is None else node.findtext(tag)
    if text is None:
        raise ValueError(f"no <{tag}>")
    return float(text)


def _voc_objects(tree: ET.Element) -> list[tuple[str, list[float], bool] | str]:
    """-> per <object>: (class name, COCO bbox, difficult) or the reason it is unusable."""
    objects = []
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            x0, y0 = _xml_number(box, "xmin") - 1, _xml_number(box, "ymin") - 1
            x1, y1 = _xml_number(box, "xmax"), _xml_number(box, "ymax")
        except ValueError as exn:
            objects.append(f"object {name or '?'}: {exn}")
            continue
        if not name:
            objects.append("object without <name>")
            continue
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((name, [x0, y0, x1 - x0, y1 - y0], difficult))
    return objects


def _voc_xml_files(root: Path, split: str | None) -> list[Path]:
    folder = root / "Annotations"
    if not folder.is_dir():
        raise ConversionError(f"{folder} not found; expected VOC_DIR/Annotations/*.xml and "
                              "VOC_DIR/JPEGImages/")  # fmt: skip
    if split is None:
        return sorted(folder.glob("*.xml"))
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise ConversionError(f"{listing} not found; drop --split to convert every xml file")
    return [folder / f"{line.split()[0]}.xml" for line in listing.read_text().splitlines()
            if line.strip()]  # fmt: skip


def _voc_image(tree: ET.Element, xml: Path, images_dir: Path) -> dict | str:
    """The image record of one VOC file (size from the xml, else the file header)."""
    file_name = (tree.findtext("filename") or f"{xml.stem}.jpg").strip()
    size = tree.find("size")
    try:
        width, height = int(_xml_number(size, "width")), int(_xml_number(size, "height"))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        header = _image_size(images_dir / file_name)
        if header is None:
            return f"no <size> and {file_name} is not a readable image"
        width, height = header
    return {"file_name": file_name, "width": width, "height": height}


def voc_to_coco(
    root: str | Path, split: str | None = None, classes: list[str] | None = None
) -> ImportedCoco:
    """``root/Annotations/*.xml`` + ``root/JPEGImages`` (Pascal VOC) -> COCO.

    VOC corners are 1-based and inclusive, so a box is ``[xmin - 1, ymin - 1, xmax - xmin + 1,
    ymax - ymin + 1]``. ``difficult`` objects become ``iscrowd: 1``: ignored by training and by
    COCO evaluation, as VOC's own metric ignores them. Classes are ``classes`` in that order, else
    the sorted names found; an object of a class not in ``classes`` is reported and skipped.
    ``split`` reads the ids from ``ImageSets/Main/<split>.txt``.
    """
    root = Path(root)
    images_dir = root / "JPEGImages"
    parsed = []
    result = ImportedCoco({"images": [], "annotations": [], "categories": []}, images_dir)
    for xml in _voc_xml_files(root, split):
        try:
            tree = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exn:
            result.skipped.append(SkippedItem(str(xml), "invalid_xml", str(exn)[:200]))
            continue
        image = _voc_image(tree, xml, images_dir)
        if isinstance(image, str):
            result.skipped.append(SkippedItem(str(xml), "invalid_xml", image))
            continue
        parsed.append((xml, image, _voc_objects(tree)))
    names = classes or sorted({o[0] for _, _, objs in parsed for o in objs if isinstance(o, tuple)})
    result.coco["categories"] = _categories(names)
    ids = {name: i + 1 for i, name in enumerate(names)}
    annotations = result.coco["annotations"]
    for image_id, (xml, image, objects) in enumerate(parsed, start=1):
        result.coco["images"].append({"id": image_id, **image})
        for obj in objects:
            if isinstance(obj, str) or obj[0] not in ids:
                reason = obj if isinstance(obj, str) else f"class {obj[0]!r} not in the class list"
                result.skipped.append(SkippedItem(str(xml), "invalid_object", reason))
                continue
            name, bbox, difficult = obj
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": ids[name], "bbox": bbox, "area": bbox[2] * bbox[3],
                                "iscrowd": int(difficult), "segmentation": []})  # fmt: skip
    return result
