"""Converters to the shard format: an ImageFolder tree or COCO json + images -> tar shards.

Both run over processes (one task per shard), show an optional tqdm bar, and write bit-for-bit
identical files for the same input (sorted inputs, fixed shard assignment, deterministic tars
and JSON). Bad input never stops a conversion: each bad image or annotation is recorded with its
file and reason in the returned :class:`ConversionSummary`, and the conversion goes on.
Only missing inputs or an empty result raise :class:`ConversionError`.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from pipeline.data.coco_clean import CleanCoco, SkippedItem, clean_bbox, clean_coco, load_coco_json
from pipeline.data.errors import ConversionError
from pipeline.data.shards import ShardInfo, shard_name, write_shard_info, write_tar

__all__ = ["ConversionSummary", "SkippedItem", "clean_bbox", "coco_to_shards", "imagefolder_to_shards"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_QUALITY = 95
# The cleaned COCO file written beside detection shards; evaluation reads it (ShardInfo).
CLEAN_ANNOTATION_FILE = "annotations.json"


@dataclass
class ConversionSummary:
    """What a conversion wrote and what it left out."""

    out: Path
    images_written: int = 0
    annotations_kept: int = 0
    boxes_clipped: int = 0
    shards: int = 0
    skipped: list[SkippedItem] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        """{reason: count} over everything skipped."""
        return dict(sorted(Counter(item.reason for item in self.skipped).items()))

    def format(self, max_items: int = 20) -> str:
        """A human-readable report: totals, then the first ``max_items`` skipped items."""
        lines = [
            f"wrote {self.images_written} images in {self.shards} shards to {self.out}",
            f"annotations kept: {self.annotations_kept} (boxes clipped to the image: {self.boxes_clipped})",
            f"skipped: {len(self.skipped)} {self.skipped_by_reason() or ''}".rstrip(),
        ]
        lines += [f"  {s.file}: {s.reason} {s.detail}".rstrip() for s in self.skipped[:max_items]]
        if len(self.skipped) > max_items:
            lines.append(f"  ... and {len(self.skipped) - max_items} more")
        return "\n".join(lines)


def _image_bytes(path: Path) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of an image file and its (width, height); non-JPEG or non-RGB is re-encoded.

    Decodes the whole image, so a corrupt or truncated file raises here (OSError and kin),
    during conversion, rather than in the middle of a training run.
    """
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decodes fully: a truncated or corrupt file raises here, not in training
        if img.format == "JPEG" and img.mode == "RGB":
            return data, img.size
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue(), img.size


def _read_image(path: Path) -> tuple[bytes | None, tuple[int, int], SkippedItem | None]:
    if not path.is_file():
        return None, (0, 0), SkippedItem(str(path), "missing_image")
    try:
        data, size = _image_bytes(path)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exn:
        return None, (0, 0), SkippedItem(str(path), "corrupt_image", str(exn)[:200])
    return data, size, None


@dataclass(frozen=True)
class _ShardTask:
    """One shard's worth of work, sent to a worker process."""

    path: Path
    # (key, image path, extra members or None, expected (w, h) or None)
    items: tuple[tuple[str, Path, dict | None, tuple[int, int] | None], ...]
    kind: str


class _ShardResult(NamedTuple):
    keys: list[str]  # keys of the samples written, in order
    annotations: int
    skipped: list[SkippedItem]


def _write_shard(task: _ShardTask) -> _ShardResult:
    """Worker: read and check each image, write the shard."""
    samples, skipped, annotations = [], [], 0
    for key, image_path, record, expected_size in task.items:
        data, size, problem = _read_image(image_path)
        if problem is None and expected_size is not None and size != expected_size:
            problem = SkippedItem(
                str(image_path), "size_mismatch", f"file {size} != json {expected_size}"
            )
        if problem is not None:
            skipped.append(problem)
            continue
        if task.kind == "classification":
            samples.append((key, {"jpg": data, "cls": str(record["label"]).encode()}))
        else:
            text = json.dumps(record, sort_keys=True, separators=(",", ":"))
            samples.append((key, {"jpg": data, "json": text.encode()}))
            annotations += len(record["annotations"])
    write_tar(task.path, samples)
    return _ShardResult([key for key, _ in samples], annotations, skipped)


def _run_tasks(
    tasks: Sequence[_ShardTask], workers: int, progress: bool, desc: str
) -> list[_ShardResult]:
    """Run shard tasks in order (in-process for 1 worker), with an optional tqdm bar."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t.items) for t in tasks), desc=desc, unit="img", disable=not progress)
    results = []
    if workers <= 1:
        outputs = map(_write_shard, tasks)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        outputs = pool.map(_write_shard, tasks)
    try:
        for task, result in zip(tasks, outputs):
            results.append(result)
            bar.update(len(task.items))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return results


def _prepare_out(out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()  # a smaller rerun must not leave stale shards from a bigger one
    return out


def _make_tasks(out: Path, items: list, shard_size: int, kind: str) -> list[_ShardTask]:
    if shard_size < 1:
        raise ConversionError(f"shard_size must be >= 1, got {shard_size}")
    count = max(1, math.ceil(len(items) / shard_size))
    return [
        _ShardTask(out / shard_name(i), tuple(items[i * shard_size : (i + 1) * shard_size]), kind)
        for i in range(count)
    ]


def _finish(
    summary: ConversionSummary,
    tasks: list[_ShardTask],
    results: list[_ShardResult],
    make_info: Callable,
) -> ConversionSummary:
    for result in results:
        summary.images_written += len(result.keys)
        summary.annotations_kept += result.annotations
        summary.skipped.extend(result.skipped)
    summary.shards = len(tasks)
    if summary.images_written == 0:
        raise ConversionError(
            f"no valid image was written to {summary.out}: {summary.skipped_by_reason()}"
        )
    info = make_info([t.path.name for t in tasks], [len(r.keys) for r in results])
    info.skipped = summary.skipped_by_reason()
    write_shard_info(info)
    return summary


def imagefolder_to_shards(
    src: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    split: str | None = None,
    progress: bool = False,
    shuffle_seed: int = 0,
) -> ConversionSummary:
    """``src/<class>/<image>`` -> classification shards in ``out`` (``<key>.jpg`` + ``<key>.cls``).

    Classes are the sorted sub-folder names (label i = i-th name). Images are put in a fixed
    pseudo-random order (``shuffle_seed``) so that every shard mixes classes, which a shuffle
    buffer alone would not achieve with class-sorted shards.
    """
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(
            f"{src} is not a folder; expected an ImageFolder tree src/<class>/<image>"
        )
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise ConversionError(f"{src} has no class sub-folders; expected src/<class>/<image>")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((src / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    random.Random(shuffle_seed).shuffle(files)
    items = [(f"{i:08d}", path, {"label": label}, None) for i, (path, label) in enumerate(files)]
    out = _prepare_out(out)
    tasks = _make_tasks(out, items, shard_size, "classification")
    results = _run_tasks(tasks, workers, progress, f"{src.name} -> shards")
    categories = [{"id": i, "name": name} for i, name in enumerate(classes)]

    def make_info(names: list[str], counts: list[int]) -> ShardInfo:
        return ShardInfo(out, "classification", split or out.name, names, counts, categories)

    return _finish(ConversionSummary(out), tasks, results, make_info)


def _coco_items(clean: CleanCoco, images_dir: Path) -> list:
    """(key, image path, sample record, expected size) per kept image, sorted by id."""
    items = []
    for image in clean.images:  # sorted by id, ids unique
        record = {"image": image, "annotations": clean.annotations.get(image["id"], [])}
        size = (image["width"], image["height"])
        items.append((f"{image['id']:012d}", images_dir / image["file_name"], record, size))
    return items


def _write_json_atomic(path: Path, record: dict) -> None:
    """Write ``record`` as compact, sorted JSON through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(record, handle, sort_keys=True, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def coco_to_shards(
    images_dir: str | Path,
    annotations_file: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    split: str | None = None,
    progress: bool = False,
) -> ConversionSummary:
    """COCO instances json + image folder -> detection shards in ``out`` (``.jpg`` + ``.json``).

    Every record that :func:`~pipeline.data.coco_clean.clean_coco` finds unusable (duplicate or
    dangling ids, wrong types, degenerate boxes, unknown categories, malformed polygons or RLE) is
    reported and skipped; boxes are clipped to the image; missing, corrupt or wrongly sized images
    are skipped. The cleaned annotation file (the images written and their kept annotations) is
    written as ``out/annotations.json``; evaluation reads it, so pycocotools sees the ground truth
    the model was trained against, and never a record that it cannot decode.
    """
    images_dir, annotations_file = Path(images_dir), Path(annotations_file)
    if not images_dir.is_dir():
        raise ConversionError(f"images folder {images_dir} not found")
    clean_path = Path(out) / CLEAN_ANNOTATION_FILE
    if clean_path.resolve() == annotations_file.resolve():
        raise ConversionError(
            f"{annotations_file} would be overwritten by the cleaned annotation file; "
            "choose another output folder"
        )
    clean = clean_coco(load_coco_json(annotations_file), str(annotations_file))
    out = _prepare_out(out)
    summary = ConversionSummary(out, skipped=list(clean.skipped))
    summary.boxes_clipped = clean.boxes_clipped
    tasks = _make_tasks(out, _coco_items(clean, images_dir), shard_size, "detection")
    results = _run_tasks(tasks, workers, progress, f"{annotations_file.name} -> shards")
    written = {int(key) for result in results for key in result.keys}
    if written:
        _write_json_atomic(clean_path, clean.to_coco(written))

    def make_info(names: list[str], counts: list[int]) -> ShardInfo:
        return ShardInfo(
            out, "detection", split or out.name, names, counts, clean.categories, clean_path.name
        )

    return _finish(summary, tasks, results, make_info)
