"""Stage inputs: where `init_from` points, and what identifies the data a stage read.

`init_from` accepts three spellings (DESIGN.md): ``stage:<name>`` (that stage's export in this
pipeline's workdir), a path to an export folder (or its ``model.safetensors``), or an MLflow
model URI ``models:/<name>@<alias>`` / ``models:/<name>/<version>``, downloaded once by rank 0
into the run folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pipeline import dist
from pipeline.run_folder import META_FILE, WEIGHTS_FILE, RunFolder
from pipeline.tracking import tracking_uri_for

STAGE_PREFIX = "stage:"
MODEL_PREFIX = "models:/"


class InputError(FileNotFoundError):
    """An input (export, registered model) is missing; the message says what produces it."""


def export_of_stage(workdir: Path, pipeline: str, stage: str) -> Path:
    return RunFolder(Path(workdir) / pipeline / stage).export_dir


def resolve_init(value: str | None, ctx) -> Path | None:
    """The export folder behind an `init_from` value (None stays None). Every rank calls it."""
    if not value:
        return None
    if value.startswith(STAGE_PREFIX):
        path = export_of_stage(ctx.workdir, ctx.pipeline, value[len(STAGE_PREFIX):])
        hint = f"run stage '{value[len(STAGE_PREFIX):]}' of pipeline '{ctx.pipeline}' first"
    elif value.startswith(MODEL_PREFIX):
        return _download_registered(value, ctx)
    else:
        path = Path(value).expanduser()
        hint = "point init_from at a finished stage's export/ folder"
    folder = path if path.is_dir() or path.suffix != ".safetensors" else path.parent
    if not (folder / WEIGHTS_FILE).is_file():
        raise InputError(f"init_from={value!r}: no export at {folder} ({hint})")
    return folder


def _download_registered(uri: str, ctx) -> Path:
    from pipeline.registry import resolve_model_uri

    safe = re.sub(r"[^\w.\-]", "_", uri[len(MODEL_PREFIX):])
    dst = Path(ctx.run_dir) / "inputs" / safe
    if dist.is_main():
        local = resolve_model_uri(uri, tracking_uri_for(ctx.workdir), dst)
        dist.broadcast_object(str(local))
    else:
        local = dist.broadcast_object(None)
    return Path(local)


def data_fingerprint(shards_root: str | Path) -> str:
    """sha256 over the `_info.json` of every split: changes when the shard set changes.

    A folder without shard sets is an error: its fingerprint would be that of "nothing", and a
    finished stage would look outdated (and be retrained) because its data moved or was unmounted.
    """
    infos = sorted(Path(shards_root).glob("*/_info.json"))
    if not infos:
        what = "has no <split>/_info.json" if Path(shards_root).is_dir() else "does not exist"
        raise InputError(f"data.shards: {shards_root} {what}; make the shards (detrforge data "
                         "...) or point data.shards at them (relative to the recipe that names it)")
    digest = hashlib.sha256()
    for info in infos:
        digest.update(info.parent.name.encode())
        digest.update(info.read_bytes())
    return digest.hexdigest()[:16]


def export_fingerprint(export_dir: Path) -> str:
    """What identifies an input export for the stage cache: its weights' sha256 from meta.json."""
    import json

    meta = Path(export_dir) / META_FILE
    if not meta.is_file():
        return "missing"
    data = json.loads(meta.read_text())
    return str(data.get("weights_sha256") or data.get("config_hash") or "unknown")


def input_fingerprints(workdir: Path, pipeline: str, depends_on: list[str],
                       data_shards: str | None) -> dict[str, str]:
    """What a stage reads, fingerprinted for the stage cache: upstream exports and its data.

    Computed when the stage starts (a SLURM stage is submitted before its inputs exist).
    """
    inputs = {f"{STAGE_PREFIX}{ref}": export_fingerprint(export_of_stage(workdir, pipeline, ref))
              for ref in depends_on}
    if data_shards:
        inputs["data"] = data_fingerprint(data_shards)
    return inputs
