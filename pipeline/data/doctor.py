"""The data-set doctor: what is wrong with a COCO data set, before anything is converted or trained.

``check_coco(annotations, images_dir)`` returns a :class:`DoctorReport`: typed
:class:`Finding` records (a code, a severity, a count, up to three examples, and what the
converter or ``finetune`` does about it), so that a command can print them and a program can act
on them. Record-level problems come from :func:`~pipeline.data.coco_clean.clean_coco`, the same
code the converter skips by, so the doctor's counts are what ``coco-to-shards`` will report.
Image files are checked by their headers only (PIL opens lazily), so a check is quick.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.data.coco_clean import CleanCoco, clean_coco, load_coco_json
from pipeline.data.errors import DataError

SEVERITIES = ("info", "warning", "error")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SKIP = "coco-to-shards skips it and reports it"
# reason of a record the converter skips -> (what it means, what the converter does)
_RECORD_PROBLEMS = {
    "invalid_category": ("category records without an integer id", _SKIP),
    "duplicate_category_id": ("category ids listed twice", "the first record of an id is kept"),
    "invalid_image_record": ("image records without int id, file_name, width, height", _SKIP),
    "duplicate_image_id": (
        "image ids listed more than once (shard keys would collide)",
        "an identical repeat is dropped; an id naming different records is dropped with its "
        "annotations",
    ),
    "invalid_annotation": ("annotations that are not objects or have wrong types", _SKIP),
    "duplicate_annotation_id": ("annotation ids listed twice", "the first one is kept"),
    "dangling_image_id": ("annotations whose image is not listed", _SKIP),
    "unknown_category": ("annotations whose category is missing from 'categories'", _SKIP),
    "invalid_bbox": ("annotations whose bbox is not 4 finite numbers", _SKIP),
    "degenerate_box": ("boxes empty or entirely outside their image", _SKIP),
    "invalid_segmentation": ("malformed polygons or RLE masks", _SKIP),
}


@dataclass(frozen=True)
class Finding:
    """One kind of problem in a data set, counted, with examples and the remedy applied."""

    # Stable identifier, e.g. "missing_image"; programs switch on it.
    code: str
    # "info" (harmless, for the record), "warning" (handled, but look at it) or "error".
    severity: str
    # How many images, annotations, categories or files it concerns.
    count: int
    # What was found, one line.
    message: str
    # What the converter or finetune does about it (or what the user should do).
    action: str
    examples: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding.severity {self.severity!r} is not one of {SEVERITIES}")


@dataclass(frozen=True)
class DoctorConfig:
    """What the doctor judges against."""

    # Planned shorter image side after resizing (pixels), as in DETR's 800 or YOLO's 640.
    input_size: int = 800
    # Planned cap on the longer side after resizing (pixels).
    max_size: int = 1333
    # Objects whose shorter box side is below this after resizing count as too small (pixels).
    min_object_px: float = 4.0
    # Annotations of the most frequent class / of the least frequent used class above this warns.
    imbalance_ratio: float = 20.0
    # Examples kept per finding.
    max_examples: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.input_size <= self.max_size:
            raise DataError(
                f"input_size must be in 1..max_size ({self.max_size}), got {self.input_size}"
            )
        if self.min_object_px < 0 or self.imbalance_ratio < 1 or self.max_examples < 0:
            raise DataError(
                "min_object_px must be >= 0, imbalance_ratio >= 1 and max_examples >= 0; got "
                f"{self.min_object_px}, {self.imbalance_ratio}, {self.max_examples}"
            )


@dataclass
class DoctorReport:
    """Findings about one annotation file (and its images folder)."""

    annotations: str
    images_dir: str | None
    # images, annotations, categories: listed in the file and kept by the converter
    stats: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def errors(self, strict: bool = False) -> list[Finding]:
        """Findings that fail the check: errors, and warnings too when ``strict``."""
        failing = ("error", "warning") if strict else ("error",)
        return [f for f in self.findings if f.severity in failing]

    def finding(self, code: str) -> Finding | None:
        """The finding with this code, if any."""
        return next((f for f in self.findings if f.code == code), None)

    def to_dict(self) -> dict:
        """JSON-friendly dict of the whole report."""
        return asdict(self)

    def format(self, strict: bool = False, markdown: bool = False) -> str:
        """Console text (or markdown for a report file): totals, then one entry per finding."""
        s = self.stats
        head = (
            f"{s.get('images', 0)} images ({s.get('images_kept', 0)} usable), "
            f"{s.get('annotations', 0)} annotations ({s.get('annotations_kept', 0)} usable), "
            f"{s.get('categories', 0)} categories"
        )
        where = f" (images: {self.images_dir})" if self.images_dir else ""
        lines = [f"# data check: {self.annotations}{where}", "", head, ""] if markdown else [
            f"data check: {self.annotations}{where}", f"  {head}"
        ]
        order = {"error": 0, "warning": 1, "info": 2}
        for f in sorted(self.findings, key=lambda f: (order[f.severity], f.code)):
            examples = f"; e.g. {', '.join(f.examples)}" if f.examples else ""
            text = f"{f.code} ({f.count}): {f.message}{examples} -> {f.action}"
            lines.append(f"- **{f.severity}** {text}" if markdown else f"  {f.severity:7s} {text}")
        errors, warnings = len(self.errors()), len(self.errors(True)) - len(self.errors())
        verdict = "FAILED" if self.errors(strict) else "ok"
        tail = f"{verdict}: {errors} errors, {warnings} warnings" + (
            " (--strict: warnings count as errors)" if strict else ""
        )
        return "\n".join([*lines, "", tail] if markdown else [*lines, tail]) + "\n"

    def write(self, path: str | Path, strict: bool = False) -> Path:
        """Write the report: JSON for a ``.json`` path, markdown otherwise."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        else:
            path.write_text(self.format(strict, markdown=True))
        return path


def _record_findings(clean: CleanCoco, limit: int) -> list[Finding]:
    """One warning per reason the converter skips records for."""
    by_reason: dict[str, list[str]] = {}
    for item in clean.skipped:
        by_reason.setdefault(item.reason, []).append(item.detail)
    findings = []
    for reason, details in sorted(by_reason.items()):
        message, action = _RECORD_PROBLEMS.get(reason, (reason, _SKIP))
        findings.append(
            Finding(reason, "warning", len(details), message, action, tuple(details[:limit]))
        )
    if clean.boxes_clipped:
        findings.append(Finding(
            "clipped_box", "warning", clean.boxes_clipped, "boxes partly outside their image",
            "coco-to-shards clips them to the image",
        ))  # fmt: skip
    return findings


def _annotation_counts(clean: CleanCoco) -> Counter:
    return Counter(a["category_id"] for anns in clean.annotations.values() for a in anns)


def _category_findings(clean: CleanCoco, limit: int) -> list[Finding]:
    ids = [c["id"] for c in clean.categories]
    if not ids:
        return [Finding("no_categories", "error", 0, "the file lists no usable category",
                        "nothing can be trained; add a 'categories' list")]  # fmt: skip
    findings = []
    if ids not in (list(range(len(ids))), list(range(1, len(ids) + 1))):
        findings.append(Finding(
            "category_ids_not_contiguous", "info", len(ids),
            f"category ids are not 0..{len(ids) - 1} or 1..{len(ids)}",
            "mapped to contiguous labels 0..C-1 in id order; nothing to do",
            tuple(str(i) for i in ids[:limit]),
        ))  # fmt: skip
    used = _annotation_counts(clean)
    unused = [f"{c['id']} {c.get('name', '')}".strip() for c in clean.categories
              if c["id"] not in used]  # fmt: skip
    if unused:
        findings.append(Finding(
            "unused_category", "warning", len(unused), "categories without any usable annotation",
            "the class keeps a classifier row but is never trained; drop it or add examples",
            tuple(unused[:limit]),
        ))  # fmt: skip
    return findings


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header (no decoding), None if unreadable."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _disk_findings(clean: CleanCoco, images_dir: Path, limit: int) -> tuple[list[Finding], int]:
    """Images missing, unreadable or of another size than the json says -> (findings, usable)."""
    problems: dict[str, list[str]] = {"missing_image": [], "unreadable_image": [],
                                      "size_mismatch": []}  # fmt: skip
    for image in clean.images:
        path = images_dir / image["file_name"]
        if not path.is_file():
            problems["missing_image"].append(image["file_name"])
            continue
        size = _header_size(path)
        if size is None:
            problems["unreadable_image"].append(image["file_name"])
        elif size != (image["width"], image["height"]):
            problems["size_mismatch"].append(
                f"{image['file_name']} is {size[0]}x{size[1]}, json {image['width']}x{image['height']}"
            )
    texts = {
        "missing_image": "images listed but missing on disk",
        "unreadable_image": "image files that are not readable images",
        "size_mismatch": "images whose size differs from the json's width/height",
    }
    findings = [
        Finding(code, "warning", len(items), texts[code], _SKIP + " (with its annotations)",
                tuple(items[:limit]))
        for code, items in problems.items() if items
    ]  # fmt: skip
    usable = len(clean.images) - sum(len(items) for items in problems.values())
    listed = {image["file_name"] for image in clean.images}
    unlisted = sorted(
        p.relative_to(images_dir).as_posix()
        for p in images_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.relative_to(images_dir).as_posix() not in listed
    )
    if unlisted:
        findings.append(Finding(
            "unlisted_image", "info", len(unlisted), "image files on disk that the json does not list",
            "not converted (harmless when train and val images share a folder)",
            tuple(unlisted[:limit]),
        ))  # fmt: skip
    return findings, usable


def _resize_scale(width: int, height: int, cfg: DoctorConfig) -> float:
    """The factor the planned resize applies: shorter side to input_size, longer capped."""
    return min(cfg.input_size / min(width, height), cfg.max_size / max(width, height))


def _size_findings(clean: CleanCoco, cfg: DoctorConfig) -> list[Finding]:
    tiny, examples, empty = 0, [], 0
    for image in clean.images:
        anns = clean.annotations.get(image["id"], [])
        empty += not anns
        scale = _resize_scale(image["width"], image["height"], cfg)
        for ann in anns:
            side = min(ann["bbox"][2], ann["bbox"][3]) * scale
            if not ann["iscrowd"] and side < cfg.min_object_px:
                tiny += 1
                if len(examples) < cfg.max_examples:
                    examples.append(f"annotation {ann['id']}: {side:.1f} px")
    findings = []
    if tiny:
        findings.append(Finding(
            "tiny_objects", "warning", tiny,
            f"objects under {cfg.min_object_px:g} px (shorter side) once the image is resized "
            f"to a {cfg.input_size} px shorter side",
            "kept, but hardly detectable at that size; plan a larger input size",
            tuple(examples),
        ))  # fmt: skip
    if empty:
        findings.append(Finding("images_without_annotations", "info", empty,
                                "images without any usable annotation",
                                "kept as negative examples"))  # fmt: skip
    return findings


def _imbalance_findings(clean: CleanCoco, cfg: DoctorConfig) -> list[Finding]:
    counts = _annotation_counts(clean)
    if len(counts) < 2:
        return []
    names = {c["id"]: str(c.get("name", c["id"])) for c in clean.categories}
    ranked = counts.most_common()
    ratio = ranked[0][1] / ranked[-1][1]
    if ratio <= cfg.imbalance_ratio:
        return []
    examples = (f"most: {names[ranked[0][0]]} {ranked[0][1]}",
                f"least: {names[ranked[-1][0]]} {ranked[-1][1]}")  # fmt: skip
    return [Finding(
        "class_imbalance", "warning", len(counts),
        f"the most frequent class has {ratio:.0f}x the annotations of the least frequent",
        "trained as is; expect noisy AP on the rare classes (add examples of them)", examples,
    )]  # fmt: skip


def _val_findings(clean: CleanCoco, val: CleanCoco, limit: int) -> list[Finding]:
    train_cats = {c["id"]: c.get("name") for c in clean.categories}
    val_cats = {c["id"]: c.get("name") for c in val.categories}
    findings = []
    if train_cats != val_cats:
        diff = sorted(
            f"{i}: train {train_cats.get(i)!r}, val {val_cats.get(i)!r}"
            for i in set(train_cats) | set(val_cats) if train_cats.get(i) != val_cats.get(i)
        )  # fmt: skip
        findings.append(Finding(
            "val_categories_differ", "error", len(diff), "train and val list different categories",
            "evaluation maps classes by id; give both files the same 'categories' list",
            tuple(diff[:limit]),
        ))  # fmt: skip
    untrained = sorted(set(_annotation_counts(val)) - set(_annotation_counts(clean)))
    if untrained:
        findings.append(Finding(
            "val_class_not_in_train", "warning", len(untrained),
            "classes annotated in val but never in train", "their AP will be about 0",
            tuple(str(val_cats.get(i, i)) for i in untrained[:limit]),
        ))  # fmt: skip
    return findings


def check_coco_dict(
    coco: dict,
    source: str,
    images_dir: str | Path | None,
    cfg: DoctorConfig | None = None,
    val: dict | None = None,
) -> DoctorReport:
    """Check a loaded COCO dict (``source`` names it); images are checked when a folder is given."""
    cfg = cfg or DoctorConfig()
    clean = clean_coco(coco, source)
    limit = cfg.max_examples
    findings = _record_findings(clean, limit) + _category_findings(clean, limit)
    usable = len(clean.images)
    if images_dir is not None:
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise DataError(f"images folder {images_dir} not found; pass the folder that "
                            "the json's file_name entries are relative to")  # fmt: skip
        disk, usable = _disk_findings(clean, images_dir, limit)
        findings += disk
    if usable == 0:
        findings.append(Finding("no_usable_image", "error", 0, "no image can be converted",
                                "conversion would fail; fix the findings above"))  # fmt: skip
    findings += _size_findings(clean, cfg) + _imbalance_findings(clean, cfg)
    if val is not None:
        findings += _val_findings(clean, clean_coco(val, "val"), limit)
    stats = {
        "images": len(coco.get("images", [])), "images_kept": usable,
        "annotations": len(coco.get("annotations", [])),
        "annotations_kept": sum(len(a) for a in clean.annotations.values()),
        "categories": len(clean.categories),
    }  # fmt: skip
    return DoctorReport(source, None if images_dir is None else str(images_dir), stats, findings)


def check_coco(
    annotations: str | Path,
    images_dir: str | Path | None,
    cfg: DoctorConfig | None = None,
    val_annotations: str | Path | None = None,
) -> DoctorReport:
    """Check a COCO instances file (and its images folder, and optionally a val file's classes)."""
    coco = load_coco_json(annotations)
    val = None if val_annotations is None else load_coco_json(val_annotations)
    return check_coco_dict(coco, str(annotations), images_dir, cfg, val)
