"""Model registry: register a stage's export, list versions, move aliases, fetch a model by URI.

An export folder (`model.safetensors` + `meta.json`) is registered as an MLflow pyfunc model: a
folder with an `MLmodel` file and the export as its artifact (`pipeline.inference.pyfunc`), logged
under the stage's run as `export/` and registered as a model version whose source is that folder,
so `mlflow.pyfunc.load_model("models:/name@alias")` and `mlflow models serve` work on it. Versions
registered before that (the export's files at the top of the source) still resolve. MLflow keeps
the alias `latest` for itself: it always means the newest version, so it is never set, only
resolved (`models:/name@latest`) and shown by `list_models` on the newest version.
MLflow is reached through `pipeline.tracking` (the library's only module that imports it).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import read_json, write_json_atomic
from pipeline.run_folder import META_FILE, WEIGHTS_FILE
from pipeline.tracking import (
    MlflowTracker,
    Tracker,
    experiment_artifact_location,
    import_mlflow,
    mlflow_client,
    send_unsent,
)

log = logging.getLogger(__name__)

EXPORT_FILES = (WEIGHTS_FILE, META_FILE)
EXPORT_ARTIFACT_PATH = "export"
LATEST_ALIAS = "latest"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")


class RegistryError(RuntimeError):
    """A registry request that cannot be served (unknown model or alias, bad export folder...)."""


@dataclass(frozen=True)
class ModelRow:
    """One registered model version, as `detrforge registry list` prints it."""

    name: str  # registered model name, `<pipeline>.<stage>`
    version: int  # MLflow version number, 1 for the first registration
    aliases: tuple[str, ...]  # e.g. ("latest", "production")
    tags: dict[str, str] = field(default_factory=dict)  # config hash, git commit, data fingerprint
    run_id: str | None = None  # run that produced the export
    source: str = ""  # artifact URI of the export folder
    created_ms: int = 0  # when the version was registered (ms since the epoch)


@contextlib.contextmanager
def _registry_errors(action: str, tracking_uri: str):
    """MLflow's own errors (server down, bad store) as a RegistryError saying what failed where."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as err:
        raise RegistryError(
            f"pipeline/registry.py: {action} at {tracking_uri} failed: {err}; check that the "
            "tracking URI is right and its server is up"
        ) from err


def parse_model_uri(uri: str) -> tuple[str, int | None, str | None]:
    """`models:/<name>@<alias>` -> (name, None, alias); `models:/<name>/<version>` -> (name, version, None)."""
    match = _MODEL_URI.match(uri)
    if match is None:
        raise RegistryError(
            f"pipeline/registry.py: {uri!r} is not a model URI; write models:/<name>@<alias> "
            "or models:/<name>/<version>"
        )
    version = match["version"]
    return match["name"], int(version) if version else None, match["alias"]


def _check_export(export_dir: Path) -> None:
    missing = [name for name in EXPORT_FILES if not (export_dir / name).is_file()]
    if missing:
        raise RegistryError(
            f"pipeline/registry.py: export folder {export_dir} lacks {', '.join(missing)}; "
            "export the model (checkpoint export) before registering it"
        )


def _run_of(tracker_or_run_id: Tracker | str, tracking_uri: str | None) -> tuple[str | None, str]:
    """(run id, tracking URI) of a tracker or of a run id plus its tracking URI."""
    if isinstance(tracker_or_run_id, str):
        if tracking_uri is None:
            raise RegistryError("pipeline/registry.py: a run id needs its tracking_uri")
        return tracker_or_run_id, tracking_uri
    if not isinstance(tracker_or_run_id, MlflowTracker):
        return None, ""  # ranks > 0 and disabled tracking register nothing
    tracker_or_run_id.flush()  # the run must exist and hold what was logged before, bounded wait
    return tracker_or_run_id.run_id, tracking_uri or tracker_or_run_id.tracking_uri


def register_model(
    tracker_or_run_id: Tracker | str, export_dir: str | Path, name: str,
    tags: Mapping[str, Any] | None = None, aliases: Iterable[str] = (LATEST_ALIAS,),
    tracking_uri: str | None = None, strict: bool = True, description: str = "",
    model_tags: Mapping[str, Any] | None = None,
) -> int | None:
    """Log export_dir under the run's `export/` artifacts and register it as a new version of name.

    description: the version's (what it is: stage, data, main metric, config hash, parent);
    model_tags: set on the registered model itself (pipeline, stage, kind).

    Returns the version number; None for a tracker that does not log (rank > 0, tracking off).
    strict=False turns a failure (server down...) into a warning and None, for callers that must
    finish anyway; the export stays on disk and can be registered later.
    """
    export_dir = Path(export_dir)
    _check_export(export_dir)
    run_id, uri = _run_of(tracker_or_run_id, tracking_uri)
    if not uri:
        return None
    try:
        if run_id is None:
            raise RegistryError(f"pipeline/registry.py: no MLflow run was created at {uri}")
        with _registry_errors(f"registering {name}", uri):
            client = mlflow_client(uri)
            return _register(client, run_id, export_dir, name, tags or {}, tuple(aliases),
                             description=description, model_tags=model_tags)
    except RegistryError as err:
        if strict:
            raise
        log.warning(
            "registry: %s was not registered (%s); the export stays in %s", name, err, export_dir
        )
        return None


def _free_artifact_path(client, run_id: str) -> str:
    """`export`, or `export_<k>` when this run registered before: a version's files never change."""
    taken = {Path(info.path).name for info in client.list_artifacts(run_id)}
    path, k = EXPORT_ARTIFACT_PATH, 1
    while path in taken:
        k += 1
        path = f"{EXPORT_ARTIFACT_PATH}_{k}"
    return path


def _register(
    client, run_id: str, export_dir: Path, name: str, tags: Mapping, aliases: tuple,
    description: str = "", model_tags: Mapping[str, Any] | None = None,
) -> int:
    import tempfile

    from pipeline.inference.pyfunc import save_pyfunc_model

    artifact_path = _free_artifact_path(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_pyfunc_model(export_dir, Path(tmp) / "model")
        client.log_artifacts(run_id, str(model_dir), artifact_path=artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    try:
        client.create_registered_model(name)
    except Exception as err:
        if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    for key, value in (model_tags or {}).items():
        client.set_registered_model_tag(name, str(key), str(value))
    str_tags = {str(k): str(v) for k, v in tags.items()}
    version = client.create_model_version(name, source, run_id=run_id, tags=str_tags,
                                          description=description or None).version
    for alias in aliases:
        if alias.lower() != LATEST_ALIAS:  # MLflow resolves `latest` itself
            client.set_registered_model_alias(name, alias, str(version))
    return int(version)


def list_models(tracking_uri: str) -> list[ModelRow]:
    """Every version of every registered model, sorted by name then version."""
    with _registry_errors("listing models", tracking_uri):
        return _list_models(mlflow_client(tracking_uri))


def _list_models(client) -> list[ModelRow]:
    # search_model_versions leaves ModelVersion.aliases empty; registered models carry them.
    aliases: dict[tuple[str, int], list[str]] = {}
    for model in _all_pages(client.search_registered_models):
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault((model.name, int(version)), []).append(alias)
    versions = _all_pages(client.search_model_versions)
    newest: dict[str, int] = {}
    for mv in versions:
        newest[mv.name] = max(newest.get(mv.name, 0), int(mv.version))
    rows = [
        _row(mv, aliases.get((mv.name, int(mv.version)), []), int(mv.version) == newest[mv.name])
        for mv in versions
    ]
    return sorted(rows, key=lambda row: (row.name, row.version))


def _all_pages(search) -> list:
    results, token = [], None
    while True:
        page = search(max_results=1000, page_token=token)
        results.extend(page)
        token = page.token
        if not token:
            return results


def _row(mv, aliases: list[str], is_newest: bool) -> ModelRow:
    return ModelRow(
        name=mv.name,
        version=int(mv.version),
        aliases=((LATEST_ALIAS,) if is_newest else ()) + tuple(sorted(aliases)),
        tags=dict(mv.tags or {}),
        run_id=mv.run_id,
        source=mv.source,
        created_ms=int(mv.creation_timestamp or 0),
    )


def promote(tracking_uri: str, name: str, version: int | str, alias: str) -> None:
    """Point alias (e.g. `production`) of model name at version."""
    if alias.lower() == LATEST_ALIAS:
        raise RegistryError(
            "pipeline/registry.py: MLflow reserves the alias 'latest' for the newest version; "
            "promote to another alias (e.g. production, staging)"
        )
    with _registry_errors(f"promoting {name} version {version} to {alias}", tracking_uri):
        client = mlflow_client(tracking_uri)
        _model_version(client, name, version=int(version), alias=None)
        client.set_registered_model_alias(name, alias, str(int(version)))


def _model_version(client, name: str, version: int | None, alias: str | None):
    """The ModelVersion for a version number or an alias, or a RegistryError saying what exists."""
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except Exception as err:
        if getattr(err, "error_code", None) not in (
            "RESOURCE_DOES_NOT_EXIST",
            "INVALID_PARAMETER_VALUE",
        ):
            raise
        wanted = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise RegistryError(
            f"pipeline/registry.py: model {name!r} has no {wanted}; see `detrforge registry list`"
        ) from err


def resolve_version(uri: str, tracking_uri: str) -> tuple[str, int, str]:
    """(name, version number, run id) of the version a `models:/` URI names now (an alias moves)."""
    name, version, alias = parse_model_uri(uri)
    with _registry_errors(f"resolving {uri}", tracking_uri):
        mv = _model_version(mlflow_client(tracking_uri), name, version, alias)
    return name, int(mv.version), mv.run_id or ""


def resolve_model_uri(uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """Download the export behind `models:/<name>@<alias>` or `models:/<name>/<version>`.

    Returns the local folder holding model.safetensors and meta.json (under dst).
    """
    name, version, alias = parse_model_uri(uri)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with _registry_errors(f"downloading {uri}", tracking_uri):
        mv = _model_version(mlflow_client(tracking_uri), name, version, alias)
        local = import_mlflow().artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(dst), tracking_uri=tracking_uri
        )
    local = _export_of_version(Path(local))
    missing = [f for f in EXPORT_FILES if not (local / f).is_file()]
    if missing:
        raise RegistryError(
            f"pipeline/registry.py: {uri} (version {mv.version}, {mv.source}) lacks "
            f"{', '.join(missing)}; register an export folder made by the checkpoint export"
        )
    return local


def _export_of_version(local: Path) -> Path:
    """The export folder of a downloaded version: inside the pyfunc model folder, or (versions
    registered as plain artifacts) the download itself."""
    if all((local / name).is_file() for name in EXPORT_FILES):
        return local
    from pipeline.inference.pyfunc import export_in_model_folder

    return export_in_model_folder(local) or local


def register_export(export_dir: str | Path, name: str, tracking_uri: str,
                    tags: Mapping[str, Any] | None = None, experiment: str = "detrforge",
                    description: str = "", model_tags: Mapping[str, Any] | None = None) -> int:
    """Register an export made outside a stage (`detrforge export --register`) under a new run
    of `experiment`, named after the model; returns the version number."""
    _check_export(Path(export_dir))
    with _registry_errors(f"registering {name}", tracking_uri):
        client = mlflow_client(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=experiment_artifact_location(tracking_uri, experiment))
        run = client.create_run(experiment_id, run_name=f"{name}-export",
                                tags={"detrforge.source": "detrforge export"})
        version = _register(client, run.info.run_id, Path(export_dir), name, tags or {},
                            (LATEST_ALIAS,), description=description, model_tags=model_tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        return version


def register_run_folder(run_dir: str | Path, tracking_uri: str) -> tuple[str, int, bool]:
    """Register the export of a finished stage whose registration failed (DONE.json with
    `model_version: null`), under the stage's MLflow run when the store knows it, and record the
    version in DONE.json (atomically). The lines of `logs/metrics.jsonl` MLflow never received
    (the stage finished during an outage) are sent first, registered or not, and a run left
    RUNNING is ended. Returns (name, version, registered now)."""
    from pipeline.run_folder import RunFolder
    from pipeline.tracking import recorded_run_id

    folder = RunFolder(run_dir)
    done = _read_json(folder.done_path, "has not finished (no DONE.json); run it first")
    meta = _read_json(folder.export_meta_path, "has no export; export it first")
    pipeline = meta.get("pipeline") or folder.root.parent.name
    name = f"{pipeline}.{meta.get('stage') or folder.root.name}"
    run_id = done.get("mlflow_run_id") or recorded_run_id(folder.root)
    run_known = bool(run_id) and _run_exists(tracking_uri, run_id)
    if run_known:  # a stage that finished during an outage: its metrics and its end
        _complete_run(folder, run_id, tracking_uri)
    if done.get("model_version"):
        return done.get("registered_model") or name, int(done["model_version"]), False
    tags, description, model_tags = _lineage_of(folder, meta, done)
    if run_known:
        version = register_model(run_id, folder.export_dir, name, tags, tracking_uri=tracking_uri,
                                 description=description, model_tags=model_tags)
    else:
        version = register_export(folder.export_dir, name, tracking_uri, tags,
                                  description=description, model_tags=model_tags)
    # tmp, fsync, rename: a kill leaves the old DONE.json or the new one, never half of one.
    write_json_atomic(folder.done_path, {**done, "registered_model": name,
                                         "model_version": version})
    return name, int(version), True


def _complete_run(folder, run_id: str, tracking_uri: str) -> None:
    """Send the metrics.jsonl lines MLflow lacks (the replay a resume would do) and end a run
    still RUNNING in the store: its stage wrote DONE.json, so it finished."""
    with _registry_errors(f"sending the metrics of {folder.root} to run {run_id}", tracking_uri):
        send_unsent(folder.root, run_id, tracking_uri)
        client = mlflow_client(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FINISHED")


def _read_json(path: Path, missing: str) -> dict:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise RegistryError(f"pipeline/registry.py: {path.parent} {missing}") from None
    except ValueError as err:  # CorruptFileError: names the file
        raise RegistryError(f"pipeline/registry.py: {err}") from None


def _run_exists(tracking_uri: str, run_id: str) -> bool:
    with _registry_errors(f"looking up run {run_id}", tracking_uri):
        try:
            mlflow_client(tracking_uri).get_run(run_id)
        except Exception as err:
            if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
    return True


def _lineage_of(folder, meta: dict, done: dict) -> tuple[dict, str, dict]:
    """(version tags, version description, registered model tags) from the run folder."""
    import json

    from pipeline.tracking import (
        PARENT_MODEL_TAG,
        parent_models,
        shard_datasets,
        version_description,
    )

    pipeline, stage = meta.get("pipeline", ""), meta.get("stage", folder.root.name)
    shards = (meta.get("config") or {}).get("data", {}).get("shards")
    datasets = shard_datasets(shards) if shards and Path(shards).is_dir() else []
    parents = parent_models(folder.root.parent.parent, pipeline, done.get("inputs"))
    tags = {"config_hash": done.get("config_hash", ""), PARENT_MODEL_TAG: ", ".join(parents)
            or "none", "data_fingerprint": json.dumps(done.get("inputs") or {}, sort_keys=True)}
    description = version_description(stage, pipeline, datasets, done.get("main_metric", ""),
                                      done.get("metrics") or {}, done.get("config_hash", ""),
                                      parents)
    return tags, description, {"detrforge.pipeline": pipeline, "detrforge.stage": stage}
