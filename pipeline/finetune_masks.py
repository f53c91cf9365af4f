"""Instance masks for `detrforge finetune --task segment`: the check that a COCO file has them,
and the panoptic ground truth the segmentation stage measures PQ and mIoU against.

The segment_finetune stage reads a panoptic view beside the shards (``panoptic_<split>.json`` and
PNGs, COCO panoptic format): stuff segments to train on and the ground truth of PQ / mIoU. A
user's COCO instances file has things only, so ``write_things_panoptic`` draws that view from the
instance masks of the cleaned val file (the one segm AP is measured against):

- each pixel belongs to the smallest instance covering it (of two overlapping objects the smaller
  one is usually in front); pixels of no instance are void (id 0), which PQ and mIoU leave out;
- crowd annotations become crowd segments (never matched, as in COCO panoptic);
- the train json lists the categories only: training reads its masks from the shards and there
  is no stuff to add.

So PQ here is things-only PQ with the background as void, and segm AP is the instance metric.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.decoding import decode_segmentation

PANOPTIC_FORMAT = "things-panoptic-1"  # bump when the drawn ground truth changes


class MaskError(ValueError):
    """An annotation file that cannot train a segmenter (no instance masks)."""


def check_masks(path: Path, annotations: Iterable) -> int:
    """The number of annotations with a mask; MaskError naming ``path`` and the fix when none or
    only some have one (an annotation without a mask would teach an empty mask)."""
    anns = [a for a in annotations if isinstance(a, dict)]
    missing = [a for a in anns if not a.get("segmentation")]
    if len(missing) == len(anns):
        raise MaskError(f"{path} has no segmentation masks (no annotation has a `segmentation` "
                        "polygon or RLE); add instance masks to it, or fine-tune boxes only with "
                        "--task detect")
    if missing:
        raise MaskError(f"{path}: {len(missing)} of {len(anns)} annotations have no segmentation "
                        f"mask (the first: id {missing[0].get('id')!r}); give each a polygon or "
                        "RLE `segmentation`, or remove it")
    return len(anns)


def panoptic_key(instances_json: Path) -> str:
    """16 hex digits identifying the panoptic view drawn from this instances file."""
    digest = hashlib.sha256(PANOPTIC_FORMAT.encode())
    digest.update(Path(instances_json).read_bytes())
    return digest.hexdigest()[:16]


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
            float(ys.max() + 1 - ys.min())]


def draw_image(image: dict, annotations: list[dict], png: Path) -> dict:
    """Write one image's panoptic PNG (id = R + 256 G + 256^2 B) -> its panoptic annotation."""
    height, width = int(image["height"]), int(image["width"])
    masks = [decode_segmentation(a["segmentation"], height, width) for a in annotations]
    ids = np.zeros((height, width), np.int64)
    for index in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        ids[masks[index]] = index + 1  # smaller instances are drawn last: they stay on top
    segments = []
    for index, ann in enumerate(annotations):
        visible = ids == index + 1
        if visible.any():
            segments.append({"id": index + 1, "category_id": int(ann["category_id"]),
                             "area": int(visible.sum()), "bbox": _bbox(visible),
                             "iscrowd": int(ann.get("iscrowd", 0))})
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(png, format="PNG")
    return {"image_id": int(image["id"]), "file_name": png.name, "segments_info": segments}


def write_things_panoptic(instances_json: Path, out_dir: Path) -> Path:
    """``out_dir`` with panoptic_{train,val}.json and panoptic_val/*.png drawn from the instance
    masks of ``instances_json`` (module docstring); an out_dir that holds them is reused."""
    out_dir = Path(out_dir)
    if (out_dir / "panoptic_val.json").is_file():
        return out_dir
    coco = json.loads(Path(instances_json).read_text())
    things = [{**c, "isthing": 1} for c in coco["categories"]]
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "panoptic_val").mkdir(parents=True)
    annotations = [draw_image(image, by_image.get(int(image["id"]), []),
                              tmp / "panoptic_val" / f"{int(image['id']):012d}.png")
                   for image in coco["images"]]
    (tmp / "panoptic_val.json").write_text(json.dumps(
        {"images": coco["images"], "annotations": annotations, "categories": things}))
    (tmp / "panoptic_train.json").write_text(json.dumps(
        {"images": [], "annotations": [], "categories": things}))
    if out_dir.exists():  # an incomplete earlier attempt
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
