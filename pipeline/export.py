"""Model-only exports (consolidated fp32 safetensors + meta.json).

An export is what the next stage (or a user) starts from: `export/model.safetensors` with the
full fp32 weights, and `export/meta.json` with whatever the stage describes (architecture config,
class names, metrics, config hash, parent artifacts). safetensors holds tensors only, so loading
an export never runs pickled code. Loading its weights into a model is
``pipeline.weights.load_partial`` (re-exported here with its ``LoadReport``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline import dist
from pipeline.atomic import fsync_dir, read_json
from pipeline.atomic import write_bytes_atomic as write_atomic_bytes
from pipeline.run_folder import META_FILE, WEIGHTS_FILE  # the run folder names its files
from pipeline.weights import LoadReport, load_partial

__all__ = ["EXPORT_FORMAT", "META_FILE", "WEIGHTS_FILE", "ExportError", "LoadReport", "export_strategy",
           "fsync_dir", "load_export", "load_partial", "write_atomic_bytes", "write_export"]

EXPORT_FORMAT = "detrforge-export-1"


class ExportError(RuntimeError):
    """An export folder is missing, incomplete or inconsistent."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_export(export_dir: str | Path, state_dict: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any]) -> Path:
    """Write weights then meta.json (the meta, written last, marks the export complete).

    `meta` must be JSON-serialisable; the weights' sha256 is added so a mismatched pair is
    detected on load. Returns the weights path. Single-process: see `export_strategy` for ranks.
    """
    from safetensors.torch import save_file

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    weights = export_dir / WEIGHTS_FILE
    tmp = export_dir / f".{WEIGHTS_FILE}.tmp"
    # Clones break storage sharing (tied weights), which safetensors refuses to write.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT})
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, weights)
    full_meta = {**meta, "format": EXPORT_FORMAT, "weights_sha256": _sha256(weights)}
    try:
        text = json.dumps(full_meta, indent=2, sort_keys=True)
    except TypeError as error:
        raise ExportError(f"export.py: meta must be JSON-serialisable: {error}") from None
    write_atomic_bytes(export_dir / META_FILE, text.encode())
    return weights


def export_strategy(strategy, export_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Consolidate the strategy's weights (fp32, also from ZeRO-3 shards) and write the export
    from rank 0. Every rank must call it."""
    state_dict = strategy.consolidated_state_dict()
    path = Path(export_dir) / WEIGHTS_FILE
    if dist.is_main():
        write_export(export_dir, state_dict, meta)
    dist.barrier()
    return path


def load_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) from an export folder or its model.safetensors file."""
    from safetensors.torch import load_file

    path = Path(path)
    export_dir = path if path.is_dir() else path.parent
    weights, meta_path = export_dir / WEIGHTS_FILE, export_dir / META_FILE
    if not weights.is_file() or not meta_path.is_file():
        raise ExportError(
            f"export.py: {export_dir} is not a complete export (needs {WEIGHTS_FILE} and "
            f"{META_FILE}); point init_from at a finished stage's export/ folder"
        )
    meta = read_json(meta_path, what="export meta",
                     fix="re-run the exporting stage (`detrforge run ... --force`)")
    expected = meta.get("weights_sha256")
    if expected is not None and expected != _sha256(weights):
        raise ExportError(
            f"export.py: {weights} does not match the sha256 in {meta_path}; the export was "
            "overwritten or is being written. Re-run the exporting stage"
        )
    return load_file(str(weights)), meta
