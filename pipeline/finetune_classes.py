"""Class mapping for fine-tuning: a new class head, with the rows of classes the model knows.

The rule (``match_classes``): a class of the new data set whose name equals one of the pretrained
model's class names, compared case-insensitively with spaces, ``_`` and ``-`` alike
("Traffic light" == "traffic_light"), keeps that class's row of every class-indexed tensor (the
classifier of each decoder layer, DINO's denoising label embedding); every other class gets a
freshly initialised row. Rows past the class count (a softmax head's no-object row, DINO's
"unknown" label) are carried over as they are.

``write_mapped_export`` applies it once, to the pretrained export: it writes a new export whose
class-indexed tensors already have the new class count, so the fine-tuning stage loads every
tensor of it through the one partial loader and nothing of the stage changes. This module is the
one place that copies class rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pipeline.export import load_export, write_export
from pipeline.run_folder import META_FILE

# Tensors whose first dimension is indexed by class: (C [+ extra], ...) in every detector kind.
CLASS_KEY = re.compile(r"(^|\.)(class_embed|label_enc)(\.\d+)?\.(weight|bias)$")
MAPPED_FORMAT = "class-mapped-1"  # bump when the mapping of rows changes: cached exports redo


class ClassMappingError(ValueError):
    """The pretrained export cannot be mapped (not a detector, no class names)."""


@dataclass(frozen=True)
class ClassMapping:
    """Which pretrained row each new class starts from."""

    new_names: tuple[str, ...]  # the data set's classes, in label order
    old_names: tuple[str, ...]  # the pretrained model's classes, in label order
    source_rows: tuple[int | None, ...]  # per new label: the pretrained label, or None (fresh)

    def __post_init__(self) -> None:
        if len(self.source_rows) != len(self.new_names):
            raise ClassMappingError("ClassMapping: one source row per new class is needed")
        bad = [r for r in self.source_rows if r is not None and not 0 <= r < len(self.old_names)]
        if bad:
            raise ClassMappingError(f"ClassMapping: source rows {bad} outside the pretrained classes")

    @property
    def kept(self) -> dict[str, str]:
        """{new class name: pretrained class name} of the classes that keep a row."""
        return {new: self.old_names[row] for new, row in zip(self.new_names, self.source_rows)
                if row is not None}

    def describe(self) -> str:
        """One line for the console."""
        kept = self.kept
        pairs = ", ".join(f"{n}<-{o}" if n != o else n for n, o in kept.items())
        return (f"class head: {len(kept)} of {len(self.new_names)} classes keep their pretrained "
                f"row{f' ({pairs})' if pairs else ''}; {len(self.new_names) - len(kept)} start "
                "fresh")


def class_key(name: str) -> str:
    """The form names are compared in: case-folded, spaces/_/- as one space, trimmed."""
    return " ".join(re.split(r"[\s_\-]+", str(name).casefold())).strip()


def match_classes(new_names: Sequence[str], old_names: Sequence[str]) -> ClassMapping:
    """The class-mapping rule (module docstring). A pretrained name listed twice maps to its
    first label; several new classes may start from the same pretrained row."""
    first: dict[str, int] = {}
    for label, name in enumerate(old_names):
        first.setdefault(class_key(name), label)
    rows = tuple(first.get(class_key(name)) for name in new_names)
    return ClassMapping(tuple(map(str, new_names)), tuple(map(str, old_names)), rows)


def class_indexed_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Keys of the tensors whose dim 0 is indexed by class."""
    return [key for key in state if CLASS_KEY.search(key)]


def map_class_rows(source: Mapping[str, Tensor], fresh: Mapping[str, Tensor],
                   mapping: ClassMapping) -> dict[str, Tensor]:
    """``source`` with every class-indexed tensor rebuilt at the new class count.

    source: the pretrained state dict; class tensors (C_old + E, ...).
    fresh: a freshly initialised model's state dict with the new class count; class tensors
    (C_new + E, ...), E extra rows (0 for sigmoid heads, 1 for softmax heads and DINO's
    label embedding). Matched rows and the E extra rows come from source, the rest from fresh.
    A class tensor whose shape does not fit that pattern keeps fresh's values.
    """
    old_n, new_n = len(mapping.old_names), len(mapping.new_names)
    out = dict(source)
    for key in class_indexed_keys(fresh):
        target = fresh[key].detach().clone()
        src = source.get(key)
        extra = target.shape[0] - new_n
        if src is None or src.shape[1:] != target.shape[1:] or src.shape[0] - old_n != extra:
            out[key] = target
            continue
        for new_label, old_label in enumerate(mapping.source_rows):
            if old_label is not None:
                target[new_label] = src[old_label]
        for j in range(extra):
            target[new_n + j] = src[old_n + j]
        out[key] = target
    return out


def _mapped_meta(meta: dict, mapping: ClassMapping, categories: list[dict], source: Path) -> dict:
    detector = {**meta["detector"], "num_classes": len(mapping.new_names)}
    keep = {k: v for k, v in meta.items() if k not in ("metrics", "weights_sha256", "format")}
    return {**keep, "detector": detector, "class_names": list(mapping.new_names),
            "categories": categories, "class_mapping": mapping.kept,
            "mapped_from": {"export": str(source), "weights_sha256": meta.get("weights_sha256"),
                            "class_names": list(mapping.old_names), "format": MAPPED_FORMAT}}


def mapped_export_key(meta: dict, categories: list[dict], seed: int) -> str:
    """What identifies a mapped export: the pretrained weights, the new classes, the seed."""
    text = json.dumps([meta.get("weights_sha256"), categories, seed, MAPPED_FORMAT],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_mapped_export(source_export: str | Path, categories: list[dict], out_dir: str | Path,
                        seed: int = 0) -> tuple[Path, ClassMapping]:
    """Write the pretrained detector export with its class head mapped to ``categories`` (the new
    data set's, in label order) into out_dir; an out_dir that already holds it is reused.
    Returns (out_dir, mapping)."""
    from pipeline.models import DetectorConfig, build_detector

    source_export, out_dir = Path(source_export), Path(out_dir)
    meta = json.loads((source_export / META_FILE).read_text())
    if meta.get("kind") != "detector" or "detector" not in meta or "class_names" not in meta:
        raise ClassMappingError(
            f"{source_export / META_FILE}: not a detector export with class_names (kind="
            f"{meta.get('kind')!r}); start from a detection stage's export")
    names = [str(c.get("name", c["id"])) for c in categories]
    mapping = match_classes(names, meta["class_names"])
    if (out_dir / META_FILE).is_file():
        return out_dir, mapping
    state, meta = load_export(source_export)
    detector = {**meta["detector"], "num_classes": len(names)}
    detector["backbone"] = {**detector.get("backbone", {}), "weights": None, "pretrained": False}
    torch.manual_seed(seed)  # the fresh rows are those the stage would draw with this seed
    cfg = DetectorConfig(**detector)
    fresh = build_detector(dataclasses.replace(cfg)).state_dict()
    mapped = map_class_rows(state, fresh, mapping)
    write_export(out_dir, mapped, _mapped_meta(meta, mapping, categories, source_export))
    return out_dir, mapping
