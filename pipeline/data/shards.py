"""The shard format: deterministic tar writers and readers, and the ``_info.json`` of a shard set.

A shard set is a folder ``<set>/<split>/`` holding ``shard-000000.tar``, ``shard-000001.tar``, ...
and ``_info.json``. Each sample is a group of tar members sharing a key (no dots in keys):

- classification: ``<key>.jpg`` (JPEG bytes) + ``<key>.cls`` (ASCII integer label 0..C-1);
- detection: ``<key>.jpg`` + ``<key>.json``: ``{"image": <COCO image record>, "annotations":
  [<COCO annotations: bbox (x, y, w, h pixels), category_id, segmentation (polygons or RLE),
  iscrowd, area, id>]}``.

``_info.json`` records the shard names, the sample count of each shard, the categories (COCO
records: id, name, and for detection ``isthing``), the split, the kind, and for detection the
annotation file kept beside the shards for evaluation. Loaders read it to know epoch sizes and
class counts without scanning the tars.

Tar files are written bit-for-bit deterministically: members in the order given, mtime 0,
uid/gid 0, empty owner names, fixed mode, USTAR format.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.atomic import write_text_atomic
from pipeline.data.errors import ShardInfoError

INFO_FILE = "_info.json"
KINDS = ("classification", "detection")


def shard_name(index: int) -> str:
    """The file name of shard ``index`` of a set: ``shard-000042.tar``."""
    return f"shard-{index:06d}.tar"


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    """Write ``[(key, {ext: bytes})]`` to a tar whose bytes depend only on its content.

    Written to a temporary name and renamed, so a crash never leaves a half shard under the
    final name.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if "." in key or "/" in key:
                raise ShardInfoError(
                    f"shard key {key!r} for {path}: keys must not contain '.' or '/'"
                )
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(name=f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def read_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` samples of one shard in file order.

    A truncated or corrupt tar raises ``tarfile.TarError`` after the samples read so far.
    """
    current_key, members = None, {}
    with tarfile.open(path, "r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _, ext = info.name.partition(".")
            if key != current_key and members:
                yield current_key, members
                members = {}
            current_key = key
            members[ext] = tar.extractfile(info).read()
    if members:
        yield current_key, members


@dataclass
class ShardInfo:
    """What ``_info.json`` says about a shard set (``root`` is the folder, not stored)."""

    # Folder holding the shards and _info.json.
    root: Path
    # "classification" or "detection".
    kind: str
    # Split name, e.g. "train" or "val".
    split: str
    # Shard file names relative to root, in order.
    shards: list[str]
    # Samples in each shard, aligned with `shards`.
    counts: list[int]
    # COCO-style category records: {"id", "name", ...}; label i of a classifier is categories[i].
    categories: list[dict]
    # Annotation file (relative to root) kept for evaluation; None for classification.
    annotation_file: str | None = None
    # What the converter dropped, by reason.
    skipped: dict[str, int] = field(default_factory=dict)
    # sha256 over the shards' bytes (name and sha256 of each, in order), recorded when the set
    # is written: the stage cache's identity of the data. None for sets made before it existed.
    content_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ShardInfoError(
                f"{self.root / INFO_FILE}: kind {self.kind!r} is not one of {KINDS}"
            )
        if len(self.shards) != len(self.counts):
            raise ShardInfoError(
                f"{self.root / INFO_FILE}: {len(self.shards)} shards but {len(self.counts)} counts;"
                " rewrite the set with the converter"
            )

    @property
    def shard_paths(self) -> list[Path]:
        """Absolute paths of the shards, in order."""
        return [self.root / name for name in self.shards]

    @property
    def num_samples(self) -> int:
        """Samples in the whole set."""
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        """Number of categories (contiguous labels 0..num_classes-1)."""
        return len(self.categories)

    @property
    def annotation_path(self) -> Path | None:
        """Absolute path of the kept COCO annotation file, if any."""
        return None if self.annotation_file is None else self.root / self.annotation_file

    def to_json(self) -> str:
        """Stable JSON text (sorted keys) for ``_info.json``; ``root`` is left out."""
        record = asdict(self)
        record.pop("root")
        return json.dumps(record, indent=1, sort_keys=True) + "\n"


def shards_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the name and the bytes' sha256 of each shard, in order."""
    digest = hashlib.sha256()
    for path in paths:
        one = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                one.update(chunk)
        digest.update(f"{Path(path).name}:{one.hexdigest()}\n".encode())
    return digest.hexdigest()


def write_shard_info(info: ShardInfo) -> Path:
    """Write ``info`` to ``<info.root>/_info.json`` (atomically) and return its path.

    The shards' content hash is filled in first: the shards were just written, so this read
    pass is mostly served from the page cache.
    """
    if info.content_sha256 is None:
        info.content_sha256 = shards_sha256(info.shard_paths)
    return write_text_atomic(Path(info.root) / INFO_FILE, info.to_json())


def load_shard_info(root: str | Path) -> ShardInfo:
    """Read ``<root>/_info.json``; raises ShardInfoError naming the fix when it is unusable."""
    root = Path(root)
    path = root / INFO_FILE
    if not path.is_file():
        raise ShardInfoError(
            f"{path} not found: {root} is not a shard set; create one with "
            "`detrforge data coco-to-shards`, `imagefolder-to-shards` or `make-samples`"
        )
    try:
        record = json.loads(path.read_text())
        info = ShardInfo(root=root, **record)
    except (json.JSONDecodeError, TypeError) as exn:
        raise ShardInfoError(
            f"{path} is not a valid shard info file ({exn}); rewrite the set"
        ) from exn
    missing = [p.name for p in info.shard_paths if not p.is_file()]
    if missing:
        raise ShardInfoError(f"{path} lists shards missing on disk: {missing[:5]}; rewrite the set")
    return info
