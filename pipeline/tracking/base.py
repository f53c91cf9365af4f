"""The tracking interface and what every tracker shares: its config, where the store is, the
MLflow import with its settings, parameter flattening, and the local metrics file.

This package is the library's only code that imports mlflow, lazily through `import_mlflow`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline.tracking")  # one logger for the whole tracking package

# MLflow reads this when an event fires, so setting it here also covers an mlflow that another
# package (deepspeed) imported first. An explicit user choice is kept.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_RUN_TAG = "mlflow.parentRunId"
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows as a run's description
# MLflow 3's UI opens an experiment in its GenAI or its model-training view from this tag
# (values from the UI: "genai_development", "custom_model_development").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
# COCO's "no ground truth of that kind" value (APl with no large object): not a measurement.
SENTINEL_VALUE = -1.0
SENTINEL_PREFIXES = ("eval/",)
# Limits from mlflow.utils.validation (MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, ...).
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAMS_OR_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_MAX_KEY_CHARS = 250
_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- :]")
# Loggers that print schema-migration chatter every time a SQLite store is opened.
_NOISY_LOGGERS = ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils")


class TrackingError(RuntimeError):
    """A tracking setting the user has to fix (bad URI, bad run status...)."""


@dataclass
class TrackingConfig:
    """Where runs are tracked and how hard the tracker tries to reach the server."""

    enabled: bool = True  # False: no MLflow; rank 0 still writes logs/metrics.jsonl
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else <workdir>/mlflow.db
    experiment: str = "detrforge"  # MLflow experiment holding the pipeline's runs
    http_timeout_s: int = 10  # MLFLOW_HTTP_REQUEST_TIMEOUT unless set in the environment
    http_max_retries: int = 1  # MLFLOW_HTTP_REQUEST_MAX_RETRIES unless set in the environment
    http_backoff_factor: int = 1  # MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR unless set in the environment
    retry_interval_s: float = 2.0  # first wait before resending after a failure (then doubles)
    max_retry_interval_s: float = 60.0  # cap on that wait
    max_queued_metrics: int = 100_000  # beyond it the oldest unsent are dropped (jsonl keeps all)
    start_timeout_s: float = 30.0  # build_tracker's wait for a new run (a new SQLite store: ~6 s)
    finish_timeout_s: float = 30.0  # how long finish() waits for the queue to drain
    system_metrics: bool = False  # MLflow's CPU, memory (and GPU) metrics of the stage process
    system_metrics_interval_s: float = 10.0  # seconds between system metric samples

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("TrackingConfig.experiment must be a non-empty experiment name")
        for name in ("http_timeout_s", "http_max_retries", "http_backoff_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (name == "http_timeout_s" and value == 0):
                raise ValueError(f"TrackingConfig.{name} must be a non-negative int, got {value!r}")
        for name in ("retry_interval_s", "max_retry_interval_s", "start_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrackingConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.system_metrics_interval_s <= 0:
            raise ValueError("TrackingConfig.system_metrics_interval_s must be > 0")
        if self.finish_timeout_s < 0 or self.max_queued_metrics < 1:
            raise ValueError(
                "TrackingConfig: finish_timeout_s must be >= 0, max_queued_metrics >= 1"
            )


def embedded_tracking_uri(workdir: str | Path) -> str:
    """The workdir's own SQLite store: `sqlite:////abs/workdir/mlflow.db` (four slashes: absolute)."""
    return "sqlite:///" + str(Path(workdir).resolve() / "mlflow.db")


def artifact_root_for(workdir: str | Path) -> Path:
    """Folder that holds the artifacts of the workdir's embedded store."""
    return Path(workdir).resolve() / "mlartifacts"


def tracking_uri_for(workdir: str | Path, cfg: TrackingConfig | None = None) -> str:
    """`cfg.tracking_uri` if set, else `$MLFLOW_TRACKING_URI`, else the workdir's SQLite store."""
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(workdir)


def experiment_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifact folder for a new experiment: next to a SQLite database, else the store decides.

    MLflow's own default for a SQLite store is `./mlartifacts` under the current directory, which
    would mix the artifacts of every workdir launched from the same place.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0]).resolve()
    folder = re.sub(r"[^\w.\-]", "_", experiment)
    return (db_path.parent / "mlartifacts" / folder).as_uri()


# A local viewer needs neither MLflow's background job runner (huey consumers for GenAI
# evaluation jobs) nor its periodic tasks: without them it starts in seconds, in one process.
UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
          "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false",
          "MLFLOW_DISABLE_TELEMETRY": "true"}


def ui_command(workdir: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """`mlflow server` over the workdir's embedded store, one worker (argv for subprocess; run
    it with `UI_ENV` in its environment)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", embedded_tracking_uri(workdir),
        "--artifacts-destination", artifact_root_for(workdir).as_uri(),
        "--host", host, "--port", str(int(port)), "--workers", "1",
    ]  # fmt: skip


def _http_settings(cfg: TrackingConfig) -> dict[str, int]:
    return {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": cfg.http_timeout_s,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": cfg.http_max_retries,
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": cfg.http_backoff_factor,
    }


_USER_HTTP_ENV = frozenset(name for name in _http_settings(TrackingConfig()) if name in os.environ)


def import_mlflow(cfg: TrackingConfig | None = None):
    """Import mlflow with telemetry off, short HTTP limits and its SQLite log noise muted."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Progress bars fill SLURM log files with carriage returns.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if cfg is not None:
        # MLflow's defaults (7 retries, 120 s) keep one request alive for minutes on a dead server.
        # MLflow reads these at each request; a value the user exported before us wins.
        for name, value in _http_settings(cfg).items():
            if name not in _USER_HTTP_ENV:
                os.environ[name] = str(value)
    import mlflow

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def mlflow_client(tracking_uri: str, cfg: TrackingConfig | None = None):
    """An `MlflowClient` bound to one store (tracking and registry), never to global state."""
    mlflow = import_mlflow(cfg)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys with string values: {"a": {"b": 1}} -> {"a.b": "1"}."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def clean_key(key: str) -> str:
    """MLflow rejects a whole batch for one bad key; replace what it does not accept."""
    return _INVALID_KEY_CHARS.sub("_", str(key))[:_MAX_KEY_CHARS]


def clip(value: str, limit: int, key: str) -> str:
    if len(value) <= limit:
        return value
    log.warning(
        "tracking: value of %r has %d chars, MLflow keeps %d; truncated", key, len(value), limit
    )
    suffix = "...[truncated]"
    return value[: limit - len(suffix)] + suffix


def without_sentinels(metrics: Mapping[str, float]) -> dict[str, float]:
    """metrics less the evaluation values that are COCO's -1 sentinel, not measurements."""
    return {
        k: v for k, v in metrics.items()
        if not (v == SENTINEL_VALUE and str(k).startswith(SENTINEL_PREFIXES))
    }  # fmt: skip


def _json_number(value: float) -> float | str:
    """Strict JSON has no NaN/Infinity; write them as the strings float() reads back."""
    return value if math.isfinite(value) else str(value)


class Tracker:
    """What the training loop and the stages log to. This base logs nothing (ranks other than 0)."""

    @property
    def run_id(self) -> str | None:
        """MLflow run id (None when not tracked or not created yet). Saved in checkpoints."""
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) parameters; nested keys become dotted ones."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at a global step. Returns at once; never raises on network errors."""

    def log_datasets(self, datasets: list) -> None:
        """Record the data sets the run read (`lineage.DatasetRecord`s) as MLflow inputs."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (in the background)."""

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Upload a folder's content (in the background)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values become strings)."""

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything logged so far is sent; False when timeout_s ran out first."""
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (status in RUN_STATUSES), sending what is queued within a bounded wait."""
        if status not in RUN_STATUSES:
            raise TrackingError(
                f"pipeline/tracking: run status {status!r} not in {RUN_STATUSES}"
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")


class NullTracker(Tracker):
    """Logs nothing anywhere: ranks other than 0, and rank 0 with tracking off and no run folder."""


class MetricsFileTracker(NullTracker):
    """Appends metrics to a JSON-lines file, one line per call: {"step", "time", "metrics"}.

    Rank 0 with tracking disabled; also the first stop of every `MlflowTracker` call. Sentinel
    values (`without_sentinels`) are left out.
    """

    def __init__(self, metrics_path: str | Path):
        self.metrics_path = Path(metrics_path)
        self._file = None
        self._lock = threading.Lock()
        self._write_failed = False  # warned once about a failing metrics file

    def log_metrics(self, metrics: Mapping[str, float], step: int,
                    time_s: float | None = None) -> int:
        """Append one line; returns the file's byte offset after it (the replay offset)."""
        values = {str(k): scalar(k, v) for k, v in metrics.items()}
        values = {k: _json_number(v) for k, v in without_sentinels(values).items()}
        stamp = time.time() if time_s is None else time_s
        line = json.dumps({"step": int(step), "time": stamp, "metrics": values}) + "\n"
        with self._lock:
            try:
                if self._file is None:
                    self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = self.metrics_path.open("ab")
                self._file.write(line.encode("utf-8"))
                self._file.flush()  # a crash or a SIGKILL right after must not lose the line
                return self._file.tell()
            except OSError as err:
                # Only rank 0 writes here: raising would stop it alone while the other ranks
                # wait in a collective. A full or failing disk costs this line, not the run.
                if not self._write_failed:
                    log.warning("cannot append to %s (%s); training goes on, MLflow still gets "
                                "the metrics", self.metrics_path, err)
                self._write_failed = True
                return self._file.tell() if self._file is not None else 0

    def finish(self, status: str = "FINISHED") -> None:
        super().finish(status)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def scalar(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TrackingError(
            f"pipeline/tracking: metric {key!r} must be a scalar (float, 0-d tensor), got "
            f"{type(value).__name__}; log .item() or a mean instead"
        ) from err
