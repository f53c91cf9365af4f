"""Generated sample data sets, deterministic from a seed, written through the real converters.

``make_samples(out, size, seed)`` writes::

    out/classify/{train,val}/   shards (<key>.jpg + <key>.cls), _info.json   20 object kinds, one
                                object per image (the detection things and variants of them)
    out/detect/{train,val}/     shards (<key>.jpg + <key>.json), _info.json  7 thing classes
    out/detect/annotations/     instances_<split>.json (RLE masks), panoptic_<split>.json and
                                panoptic_<split>/*.png (COCO panoptic: id = R + 256 G + 256^2 B,
                                3 stuff classes with isthing = 0)
    out/domain/{train,val}/     aerial scenes, 5 other thing classes, many small objects
    out/domain/annotations/     instances_<split>.json
    out/<set>/raw/<split>/      the source images the converters read

Every image is seeded by (seed, set, split, index), so a set is identical whatever the number
of workers, and the shards are bit-for-bit identical between runs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import objects, synthetic
from pipeline.data.convert import ConversionSummary, coco_to_shards, imagefolder_to_shards
from pipeline.data.errors import DataError
from pipeline.data.shards import load_shard_info

JPEG_QUALITY = 90
SPLITS = ("train", "val")
SET_IDS = {"classify": 0, "detect": 1, "domain": 2}


@dataclass(frozen=True)
class SampleSetSize:
    """Image counts, image side and shard size of one generated set."""

    train: int
    val: int
    side: int
    shard_size: int


SIZES = {
    # For tests: a second to generate, still several shards per training split.
    "tiny": {
        "classify": SampleSetSize(48, 12, 32, 16),
        "detect": SampleSetSize(24, 10, 96, 8),
        "domain": SampleSetSize(16, 8, 96, 8),
    },
    "small": {
        "classify": SampleSetSize(3000, 400, 112, 250),
        "detect": SampleSetSize(300, 40, 128, 50),
        "domain": SampleSetSize(200, 40, 128, 50),
    },
    "medium": {
        "classify": SampleSetSize(30000, 4000, 112, 1000),
        "detect": SampleSetSize(3000, 400, 128, 250),
        "domain": SampleSetSize(2000, 400, 128, 250),
    },
}


def _rng(seed: int, set_name: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SET_IDS[set_name], SPLITS.index(split), index])


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="JPEG", quality=JPEG_QUALITY)


def _classify_image(args: tuple) -> None:
    raw, seed, split, index, side = args
    label = index % len(objects.CLASSIFY_CLASSES)
    image = objects.render_object_image(_rng(seed, "classify", split, index), label, side)
    _save_jpeg(image, raw / objects.CLASSIFY_CLASSES[label] / f"{index:06d}.jpg")


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() + 1 - xs.min()),
        float(ys.max() + 1 - ys.min()),
    ]


def _panoptic_png(scene, instances: list, path: Path) -> list[dict]:
    """Write the panoptic PNG of a detect scene -> its segments_info."""
    stuff_ids = {c["id"] for c in synthetic.DETECT_STUFF}
    panoptic = np.zeros(scene.segments.shape, np.int64)  # 0 = void: things dropped as hidden
    segments = [
        (seg, cat, scene.segments == seg)
        for seg, cat in scene.segment_categories.items()
        if cat in stuff_ids
    ]
    segments += [(1000 + i, cat, mask) for i, (cat, mask) in enumerate(instances)]
    info = []
    for segment_id, category_id, mask in segments:
        if mask.any():
            panoptic[mask] = segment_id
            info.append(
                {
                    "id": segment_id,
                    "category_id": category_id,
                    "area": int(mask.sum()),
                    "bbox": _bbox(mask),
                    "iscrowd": 0,
                }
            )
    rgb = np.stack([panoptic % 256, panoptic // 256 % 256, panoptic // 65536], axis=-1).astype(
        np.uint8
    )
    Image.fromarray(rgb).save(path, format="PNG")
    return info


def _scene_image(args: tuple) -> dict:
    """Render, save and annotate one detect/domain image -> {"image", "annotations", "panoptic"}."""
    set_name, raw, seed, split, index, side = args
    rng = _rng(seed, set_name, split, index)
    record = {"id": index + 1, "file_name": f"{index + 1:06d}.jpg"}
    panoptic = None
    if set_name == "detect":
        long_side = int(rng.integers(side, side * 3 // 2 + 1))
        h, w = (side, long_side) if rng.random() < 0.75 else (long_side, side)
        image, instances, scene = synthetic.render_detect_scene(rng, h, w)
        png = raw.parent.parent / "annotations" / f"panoptic_{split}" / f"{index + 1:06d}.png"
        panoptic = {
            "image_id": index + 1,
            "file_name": png.name,
            "segments_info": _panoptic_png(scene, instances, png),
        }
    else:
        image, instances = synthetic.render_aerial_scene(rng, side)
    _save_jpeg(image, raw / record["file_name"])
    record["height"], record["width"] = image.shape[:2]
    anns = [
        {
            "image_id": index + 1,
            "category_id": cat,
            "bbox": _bbox(mask),
            "area": int(mask.sum()),
            "iscrowd": 0,
            "segmentation": _rle(mask),
        }
        for cat, mask in instances
    ]
    return {"image": record, "annotations": anns, "panoptic": panoptic}


def _map(fn: Callable, tasks: list, workers: int) -> list:
    if workers <= 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, tasks, chunksize=16))


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")


def _coco_files(set_name: str, split: str, results: list, root: Path) -> Path:
    """Write instances_<split>.json (and panoptic_<split>.json for detect) -> instances path."""
    things = synthetic.DETECT_THINGS if set_name == "detect" else synthetic.AERIAL_THINGS
    categories = [{**c, "isthing": 1, "supercategory": set_name} for c in things]
    annotations = [ann for r in results for ann in r["annotations"]]
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id
    header = {"info": {"description": f"detrforge generated {set_name} samples"}, "licenses": []}
    instances = root / "annotations" / f"instances_{split}.json"
    images = [r["image"] for r in results]
    _write_json(
        instances,
        {**header, "images": images, "annotations": annotations, "categories": categories},
    )
    if set_name == "detect":
        stuff = [{**c, "isthing": 0, "supercategory": "stuff"} for c in synthetic.DETECT_STUFF]
        panoptic = {
            **header,
            "images": images,
            "annotations": [r["panoptic"] for r in results],
            "categories": categories + stuff,
        }
        _write_json(root / "annotations" / f"panoptic_{split}.json", panoptic)
    return instances


def _make_set(
    out: Path,
    set_name: str,
    split: str,
    spec: SampleSetSize,
    seed: int,
    workers: int,
    progress: bool,
) -> ConversionSummary:
    root = out / set_name
    raw = root / "raw" / split
    count = spec.train if split == "train" else spec.val
    # A rerun (e.g. small after medium) must not pick up images left by the previous one.
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(root / "annotations" / f"panoptic_{split}", ignore_errors=True)
    if set_name == "classify":
        for name in objects.CLASSIFY_CLASSES:
            (raw / name).mkdir(parents=True, exist_ok=True)
        _map(_classify_image, [(raw, seed, split, i, spec.side) for i in range(count)], workers)
        return imagefolder_to_shards(
            raw, root / split, spec.shard_size, workers, split=split, progress=progress
        )
    raw.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    if set_name == "detect":
        (root / "annotations" / f"panoptic_{split}").mkdir()
    results = _map(
        _scene_image, [(set_name, raw, seed, split, i, spec.side) for i in range(count)], workers
    )
    instances = _coco_files(set_name, split, results, root)
    return coco_to_shards(
        raw, instances, root / split, spec.shard_size, workers, split=split, progress=progress
    )


def samples_are_current(out: str | Path) -> bool:
    """Whether ``out`` holds every sample set as this version generates them (a classification
    set of an older version, e.g. 12 texture classes, is not current)."""
    out = Path(out)
    if not all((out / name / "val" / "_info.json").is_file() for name in SET_IDS):
        return False
    return load_shard_info(out / "classify" / "val").num_classes == len(objects.CLASSIFY_CLASSES)


def make_samples(
    out: str | Path, size: str = "small", seed: int = 0, workers: int = 1, progress: bool = False
) -> dict[str, ConversionSummary]:
    """Generate the classify, detect and domain sample sets under ``out``.

    Returns the converter summaries keyed ``"<set>/<split>"``. ``size`` is "small" (the demo:
    seconds to generate), "medium" (about ten times the images) or "tiny" (for tests).
    """
    if size not in SIZES:
        raise DataError(f"sample size {size!r} is not one of {sorted(SIZES)}")
    out = Path(out)
    summaries = {}
    for set_name, spec in SIZES[size].items():
        for split in SPLITS:
            summaries[f"{set_name}/{split}"] = _make_set(
                out, set_name, split, spec, seed, workers, progress
            )
    return summaries
