"""Stage inputs: where `init_from` points, and what identifies the data a stage read.

`init_from` accepts three spellings (DESIGN.md): ``stage:<name>`` (that stage's export in this
pipeline's workdir), a path to an export folder (or its ``model.safetensors``), or an MLflow
model URI ``models:/<name>@<alias>`` / ``models:/<name>/<version>``, downloaded once by rank 0
into the run folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.atomic import CorruptFileError, read_json
from pipeline.run_folder import META_FILE, WEIGHTS_FILE, RunFolder
from pipeline.tracking import tracking_uri_for

STAGE_PREFIX = "stage:"
MODEL_PREFIX = "models:/"
INPUT_KEYS = ("init_from", "backbone_init")  # config keys naming an export a stage starts from


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
    from pipeline.model_cache import safe_folder_name
    from pipeline.registry import resolve_model_uri

    safe = safe_folder_name(uri[len(MODEL_PREFIX):])
    dst = Path(ctx.run_dir) / "inputs" / safe
    # Rank 0 downloads; its outcome, failure included, reaches every rank before anyone acts,
    # so a registry error stops all ranks at once with the same message (no rank left waiting).
    outcome: tuple[str, str] | None = None
    if dist.is_main():
        try:
            outcome = ("ok", str(resolve_model_uri(uri, tracking_uri_for(ctx.workdir), dst)))
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            outcome = ("error", f"{type(error).__name__}: {error}")
    kind, value = dist.broadcast_object(outcome)
    if kind == "error":
        raise InputError(f"init_from={uri!r}: {value}")
    return Path(value)


def data_fingerprint(shards_root: str | Path) -> str:
    """sha256 over the `_info.json` of every split: changes when the shard set changes (an
    `_info.json` records the shards' content sha256 since it exists; older sets are known by
    their index only).

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
    meta = Path(export_dir) / META_FILE
    if not meta.is_file():
        return "missing"
    data = read_json(meta, what="export meta", fix="re-run the stage that wrote it")
    return str(data.get("weights_sha256") or data.get("config_hash") or "unknown")


def export_is_intact(export_dir: Path) -> bool:
    """Whether an export's weights still match the sha256 its meta.json recorded."""
    weights, meta = Path(export_dir) / WEIGHTS_FILE, Path(export_dir) / META_FILE
    if not weights.is_file() or not meta.is_file():
        return False
    try:
        expected = read_json(meta).get("weights_sha256")
    except (CorruptFileError, AttributeError):
        return False
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return expected == digest.hexdigest()


def registered_fingerprint(uri: str, tracking_uri: str) -> str:
    """The version an MLflow model URI resolves to now, and the run that made it: a moved
    alias changes it. Asks the registry (no download)."""
    from pipeline.registry import RegistryError, parse_model_uri
    from pipeline.tracking import mlflow_client

    name, version, alias = parse_model_uri(uri)
    client = mlflow_client(tracking_uri)
    try:
        found = (client.get_model_version_by_alias(name, alias) if alias is not None
                 else client.get_model_version(name, str(version)))
    except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types
        raise RegistryError(f"stages/inputs.py: cannot resolve {uri} in {tracking_uri} "
                            f"({' '.join(str(err).split())[:160]})") from None
    return f"{found.name}/{found.version}:{found.run_id}"


def _path_inputs(cfg: Any) -> list[str]:
    """The `init_from`-like values of a config that are paths or model URIs (not stage:)."""
    found = []
    for key in INPUT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, (str, Path)) and value and not str(value).startswith(STAGE_PREFIX):
            found.append(str(value))
    return found


def _fingerprint_ref(ref: str, workdir: Path, cfg: Any) -> str:
    if ref.startswith(MODEL_PREFIX):
        return registered_fingerprint(ref, tracking_uri_for(workdir, getattr(cfg, "tracking",
                                                                              None)))
    path = Path(ref).expanduser()
    return export_fingerprint(path if path.suffix != ".safetensors" else path.parent)


def input_fingerprints(workdir: Path, pipeline: str, depends_on: list[str],
                       data_shards: str | None, *, cfg: Any = None,
                       processes: int | None = None) -> dict[str, str]:
    """What a stage reads, fingerprinted by content for the stage cache: upstream exports
    (their weights' sha256), path and models:/ inputs of `cfg` (an export's sha256; the model
    version an alias resolves to), its data (the shard index, which records the shards' content
    hash) and the number of processes (ranks change the batches each optimizer step sees).

    Computed when the stage starts (a SLURM stage is submitted before its inputs exist).
    """
    inputs = {f"{STAGE_PREFIX}{ref}": export_fingerprint(export_of_stage(workdir, pipeline, ref))
              for ref in depends_on}
    for ref in _path_inputs(cfg):
        inputs[ref] = _fingerprint_ref(ref, Path(workdir), cfg)
    if data_shards:
        inputs["data"] = data_fingerprint(data_shards)
    if processes is not None:
        inputs["processes"] = str(processes)
    return inputs
