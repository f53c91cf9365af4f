"""A user's COCO train/val folders as a cached shard set: ``<workdir>/datasets/<hash>/{train,val}``.

The hash is over what the conversion reads: each annotation file's bytes, and the name, size
and modification time of every image file the file lists (a missing one counts too), plus the
converter's format version. So a second call with unchanged inputs converts nothing, and an
edited json or a replaced image makes a new shard set (the old one stays for the runs that used
it). A shard set is written under a temporary name and renamed when both splits are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.coco_clean import load_coco_json

DATASETS_DIR = "datasets"
CACHE_FORMAT = "finetune-shards-1"  # bump when the conversion's output changes
SPLITS = ("train", "val")


@dataclass(frozen=True)
class CocoSplit:
    """One split as the user gives it: an instances json and the folder its file_names are in."""

    annotations: Path
    images: Path

    def __post_init__(self) -> None:
        if not self.annotations.is_file():
            raise FileNotFoundError(f"annotation file {self.annotations} not found")
        if not self.images.is_dir():
            raise FileNotFoundError(f"images folder {self.images} not found")


def _file_stamp(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def split_digest(split: CocoSplit, digest) -> None:
    """Feed one split's identity (json bytes; listed images' names, sizes, mtimes) to digest."""
    data = split.annotations.read_bytes()
    digest.update(hashlib.sha256(data).digest())
    names = sorted({str(image.get("file_name")) for image in json.loads(data).get("images", [])
                    if isinstance(image, dict)})
    for name in names:
        digest.update(f"{name}\0{_file_stamp(split.images / name)}\n".encode())


def dataset_hash(train: CocoSplit, val: CocoSplit) -> str:
    """16 hex digits identifying the inputs of a conversion (module docstring)."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for split in (train, val):
        split_digest(split, digest)
    return digest.hexdigest()[:16]


def cached_shards(workdir: Path, key: str) -> Path | None:
    """The shard set of this key when both splits are complete, else None."""
    root = Path(workdir) / DATASETS_DIR / key
    return root if all((root / s / "_info.json").is_file() for s in SPLITS) else None


def convert_splits(workdir: Path, train: CocoSplit, val: CocoSplit,
                   workers: int = 1) -> tuple[Path, bool, list]:
    """(shard root, converted now?, conversion summaries) of the cached or new shard set."""
    from pipeline.data.convert import coco_to_shards

    key = dataset_hash(train, val)
    found = cached_shards(workdir, key)
    if found is not None:
        return found, False, []
    root = Path(workdir) / DATASETS_DIR / key
    tmp = root.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    summaries = [coco_to_shards(s.images, s.annotations, tmp / name, workers=workers, split=name)
                 for name, s in zip(SPLITS, (train, val))]
    (tmp / "sources.json").write_text(json.dumps(
        {name: {"annotations": str(s.annotations), "images": str(s.images)}
         for name, s in zip(SPLITS, (train, val))}, indent=1))
    if root.exists():  # an incomplete earlier attempt
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root, True, summaries


def load_split_json(split: CocoSplit) -> dict:
    """The split's COCO dict (typed error naming the file when it is not valid JSON)."""
    return load_coco_json(split.annotations)
