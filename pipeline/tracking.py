"""Experiment tracking: one `Tracker` interface; an MLflow tracker that never blocks training.

Only rank 0 logs. Every `log_metrics` call is first appended to `<run_folder>/logs/metrics.jsonl`
(local disk, so nothing is lost), then queued for MLflow. A background thread sends the queue in
batches with a short HTTP timeout; when the server is down it warns, keeps the newest metrics
(bounded) and resends them when the server is back. A step never waits on the network.

This is the library's only module that imports mlflow, lazily through `import_mlflow`
(`pipeline/registry.py` reaches MLflow through it too).

    parent = start_parent_run(cfg, workdir, rank, "demo")  # once per pipeline invocation
    tracker = build_tracker(cfg, workdir, rank, "detr_pretrain", parent_run_id=parent.run_id,
                            resume_run_id=saved_run_id, run_folder=run_folder)
    tracker.log_metrics({"loss": 0.7}, step=100)  # returns at once
    tracker.finish()  # "FAILED" / "KILLED" (preempted; a resume re-attaches) otherwise
"""

from __future__ import annotations

import collections
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

log = logging.getLogger(__name__)

# MLflow reads this when an event fires, so setting it here also covers an mlflow that another
# package (deepspeed) imported first. An explicit user choice is kept.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_RUN_TAG = "mlflow.parentRunId"
# Limits from mlflow.utils.validation (MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, ...).
_MAX_PARAM_VALUE_CHARS = 6000
_MAX_TAG_VALUE_CHARS = 8000
_MAX_PARAMS_OR_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
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


def ui_command(workdir: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """`mlflow ui` over the workdir's embedded store (argv for subprocess)."""
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", embedded_tracking_uri(workdir),
        "--artifacts-destination", artifact_root_for(workdir).as_uri(),
        "--host", host, "--port", str(int(port)),
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


def _clean_key(key: str) -> str:
    """MLflow rejects a whole batch for one bad key; replace what it does not accept."""
    return _INVALID_KEY_CHARS.sub("_", str(key))[:_MAX_KEY_CHARS]


def _clip(value: str, limit: int, key: str) -> str:
    if len(value) <= limit:
        return value
    log.warning(
        "tracking: value of %r has %d chars, MLflow keeps %d; truncated", key, len(value), limit
    )
    suffix = "...[truncated]"
    return value[: limit - len(suffix)] + suffix


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


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
                f"pipeline/tracking.py: run status {status!r} not in {RUN_STATUSES}"
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")


class NullTracker(Tracker):
    """Logs nothing anywhere: ranks other than 0, and rank 0 with tracking off and no run folder."""


class MetricsFileTracker(NullTracker):
    """Appends metrics to a JSON-lines file, one line per call: {"step", "time", "metrics"}.

    Rank 0 with tracking disabled; also the first stop of every `MlflowTracker` call.
    """

    def __init__(self, metrics_path: str | Path):
        self.metrics_path = Path(metrics_path)
        self._file = None
        self._lock = threading.Lock()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {str(k): _json_number(_scalar(k, v)) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), "time": time.time(), "metrics": values})
        with self._lock:
            if self._file is None:
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.metrics_path.open("a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()  # a crash or a SIGKILL right after must not lose the line

    def finish(self, status: str = "FINISHED") -> None:
        super().finish(status)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _scalar(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TrackingError(
            f"pipeline/tracking.py: metric {key!r} must be a scalar (float, 0-d tensor), got "
            f"{type(value).__name__}; log .item() or a mean instead"
        ) from err


def _is_transient(err: BaseException) -> bool:
    """Worth retrying: the server is down, overloaded or timed out (not a rejected request)."""
    status_code = getattr(err, "get_http_status_code", None)  # MlflowException and RestException
    if status_code is not None:
        code = status_code()
        return code >= 500 or code == 429
    if type(err).__name__ == "OperationalError":  # SQLite locked, or two processes migrating it
        return True
    root_module = type(err).__module__.split(".")[0]
    return isinstance(err, ConnectionError | TimeoutError) or root_module in ("requests", "urllib3")


@dataclass
class _Op:
    kind: str  # open | metrics | params | tags | artifact | artifacts | terminate
    payload: Any = None


class _RunSender:
    """Background thread owning the MLflow client; sends queued operations in order.

    A transient failure puts the batch back at the head of the queue and retries after a growing
    wait; a rejected request (4xx) is dropped with a warning so it cannot block what follows.
    """

    def __init__(self, tracking_uri: str, cfg: TrackingConfig, open_run, run_id: str | None):
        self.tracking_uri, self.cfg, self._open_run = tracking_uri, cfg, open_run
        self.run_id, self.dropped_metrics = run_id, 0
        self._client = None
        self._ops: collections.deque[_Op] = collections.deque([_Op("open")])
        self._queued_metrics = 0
        self._cond = threading.Condition()
        self._busy = self._down = self._stopping = self._abandon = self._wake = False
        self._disabled = False
        self.opened = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    @property
    def queued_metrics(self) -> int:
        return self._queued_metrics

    def push(self, op: _Op) -> None:
        with self._cond:
            if self._stopping or self._disabled:
                return
            self._ops.append(op)
            if op.kind == "metrics":
                self._queued_metrics += len(op.payload)
                self._drop_oldest_metrics()
            self._cond.notify_all()

    def _drop_oldest_metrics(self) -> None:
        while self._queued_metrics > self.cfg.max_queued_metrics:
            index = next(i for i, op in enumerate(self._ops) if op.kind == "metrics")
            dropped = self._ops[index]
            del self._ops[index]
            self._queued_metrics -= len(dropped.payload)
            if self.dropped_metrics == 0:
                log.warning(
                    "tracking: more than %d metrics wait for MLflow; dropping the oldest "
                    "(they stay in logs/metrics.jsonl)", self.cfg.max_queued_metrics,
                )  # fmt: skip
            self.dropped_metrics += len(dropped.payload)

    def flush(self, timeout_s: float | None) -> bool:
        with self._cond:
            self._wake = True  # cut a retry wait short
            self._cond.notify_all()
            return self._cond.wait_for(
                lambda: (not self._ops and not self._busy) or self._disabled, timeout_s
            )

    def close(self, timeout_s: float) -> bool:
        """Stop accepting work, send what is queued within timeout_s, then let the thread go."""
        with self._cond:
            self._stopping = True
        drained = self.flush(timeout_s)
        with self._cond:
            self._abandon = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        return drained

    def _loop(self) -> None:
        delay = self.cfg.retry_interval_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._ops or self._stopping or self._abandon)
                if self._abandon or not self._ops:
                    return
                batch = self._take_batch()
                self._busy, self._wake = True, False
            outcome = self._attempt(batch)
            with self._cond:
                self._busy = False
                if outcome == "retry":
                    self._ops.extendleft(reversed(batch))
                    self._queued_metrics += sum(
                        len(op.payload) for op in batch if op.kind == "metrics"
                    )
                self._cond.notify_all()
                if outcome == "retry":
                    # While finishing, retry at the short interval: the wait there is bounded.
                    wait_s = self.cfg.retry_interval_s if self._stopping else delay
                    self._cond.wait_for(lambda: self._abandon or self._wake, wait_s)
            delay = (
                min(delay * 2, self.cfg.max_retry_interval_s)
                if outcome == "retry"
                else self.cfg.retry_interval_s
            )

    def _take_batch(self) -> list[_Op]:
        """The head operation; consecutive metric operations are merged into one log_batch."""
        batch = [self._ops.popleft()]
        if batch[0].kind == "metrics":
            count = len(batch[0].payload)
            while self._ops and self._ops[0].kind == "metrics":
                if count + len(self._ops[0].payload) > _MAX_METRICS_PER_BATCH:
                    break
                count += len(self._ops[0].payload)
                batch.append(self._ops.popleft())
            self._queued_metrics -= count
        return batch

    def _attempt(self, batch: list[_Op]) -> str:
        try:
            self._send(batch)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            if _is_transient(err):
                if not self._down:
                    log.warning(
                        "tracking: cannot reach MLflow at %s (%s); training goes on, metrics are "
                        "queued and kept in logs/metrics.jsonl", self.tracking_uri, err,
                    )  # fmt: skip
                self._down = True
                return "retry"
            self._reject(batch, err)
            return "drop"
        if self._down:
            log.warning(
                "tracking: MLflow at %s is reachable again; sending the queue", self.tracking_uri
            )
            self._down = False
        return "sent"

    def _reject(self, batch: list[_Op], err: Exception) -> None:
        if batch[0].kind != "open":
            log.warning("tracking: MLflow rejected %s (%s); dropped", batch[0].kind, err)
            return
        log.warning(
            "tracking: cannot open an MLflow run at %s (%s); tracking is off",
            self.tracking_uri,
            err,
        )
        with self._cond:
            self._disabled = True
            self._ops.clear()
            self._queued_metrics = 0
            self._cond.notify_all()

    def _send(self, batch: list[_Op]) -> None:
        mlflow = import_mlflow(self.cfg)
        entities = mlflow.entities
        kind, payload = batch[0].kind, batch[0].payload
        if kind == "open":
            if self._client is None:
                self._client = mlflow_client(self.tracking_uri, self.cfg)
            self.run_id = self._open_run(self._client)
            self.opened.set()
        elif kind == "metrics":
            metrics = [entities.Metric(*m) for op in batch for m in op.payload]
            for chunk in _chunks(metrics, _MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)
        elif kind in ("params", "tags"):
            make = entities.Param if kind == "params" else entities.RunTag
            for chunk in _chunks([make(k, v) for k, v in payload], _MAX_PARAMS_OR_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, **{kind: chunk}, synchronous=True)
        elif kind == "artifact":
            self._client.log_artifact(self.run_id, *payload)
        elif kind == "artifacts":
            self._client.log_artifacts(self.run_id, *payload)
        elif kind == "terminate":
            self._client.set_terminated(self.run_id, status=payload)


class MlflowTracker(Tracker):
    """Rank 0's tracker: metrics.jsonl first, then MLflow through a `_RunSender` thread.

    resume_run_id re-attaches to that run (same run id, metrics continue at their steps); a run
    id the store does not know starts a new run with a warning.
    """

    def __init__(
        self,
        tracking_uri: str,
        cfg: TrackingConfig,
        run_name: str,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
        metrics_path: str | Path | None = None,
        tags: Mapping[str, Any] | None = None,
    ):
        self.tracking_uri, self.cfg, self._run_name = tracking_uri, cfg, run_name
        self._parent_run_id, self._resume_run_id = parent_run_id, resume_run_id
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        self._metrics_file = MetricsFileTracker(metrics_path) if metrics_path else NullTracker()
        self._finished = False
        self._sender = _RunSender(tracking_uri, cfg, self._open_run, run_id=resume_run_id)

    @property
    def run_id(self) -> str | None:
        return self._sender.run_id

    @property
    def dropped_metrics(self) -> int:
        """Metrics dropped from the full queue (still in metrics.jsonl)."""
        return self._sender.dropped_metrics

    def wait_until_started(self, timeout_s: float) -> bool:
        """Wait until the MLflow run exists (created or re-attached); False on timeout."""
        return self._sender.opened.wait(timeout_s)

    def _open_run(self, client) -> str:
        """Runs on the sender thread: re-attach to resume_run_id or create a new run."""
        if self._resume_run_id:
            try:
                run = client.get_run(self._resume_run_id)
            except Exception as err:
                if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(
                    "tracking: run %s is not in %s; starting a new run",
                    self._resume_run_id,
                    self.tracking_uri,
                )
            else:
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id
        tags = dict(self._tags)
        if self._parent_run_id:
            tags[PARENT_RUN_TAG] = self._parent_run_id
        run = client.create_run(self._experiment_id(client), run_name=self._run_name, tags=tags)
        return run.info.run_id

    def _experiment_id(self, client) -> str:
        name = self.cfg.experiment
        if self.tracking_uri.startswith("sqlite:///"):
            # SQLite creates the database file but not its folder.
            Path(self.tracking_uri[len("sqlite:///") :].split("?", 1)[0]).parent.mkdir(
                parents=True, exist_ok=True
            )
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                location = experiment_artifact_location(self.tracking_uri, name)
                return client.create_experiment(name, artifact_location=location)
            except Exception as err:  # another stage created it between our two calls
                if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten_params(params)
        items = [(_clean_key(k), _clip(v, _MAX_PARAM_VALUE_CHARS, k)) for k, v in flat.items()]
        self._sender.push(_Op("params", items))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {_clean_key(k): _scalar(k, v) for k, v in metrics.items()}
        self._metrics_file.log_metrics(values, step)
        now_ms = int(time.time() * 1000)
        self._sender.push(_Op("metrics", [(k, v, now_ms, int(step)) for k, v in values.items()]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._push_artifact("artifact", Path(path), artifact_path, Path.is_file)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._push_artifact("artifacts", Path(directory), artifact_path, Path.is_dir)

    def _push_artifact(self, kind: str, path: Path, artifact_path: str | None, exists) -> None:
        if not exists(path):  # a missing file is a warning, not a reason to stop training
            log.warning("tracking: %s %s does not exist; not logged", kind, path)
            return
        self._sender.push(_Op(kind, (str(path.resolve()), artifact_path)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [(_clean_key(k), _clip(str(v), _MAX_TAG_VALUE_CHARS, k)) for k, v in tags.items()]
        self._sender.push(_Op("tags", items))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the queue to drain, at most timeout_s (None: cfg.finish_timeout_s)."""
        return self._sender.flush(self.cfg.finish_timeout_s if timeout_s is None else timeout_s)

    def finish(self, status: str = "FINISHED") -> None:
        super().finish(status)
        if self._finished:
            return
        self._finished = True
        self._sender.push(_Op("terminate", status))
        if not self._sender.close(self.cfg.finish_timeout_s):
            log.warning(
                "tracking: MLflow still unreachable after %.0f s; %d metrics were not sent "
                "(all are in logs/metrics.jsonl)", self.cfg.finish_timeout_s, self._sender.queued_metrics,
            )  # fmt: skip
        self._metrics_file.finish(status)


def build_tracker(
    cfg: TrackingConfig,
    workdir: str | Path,
    rank: int,
    run_name: str,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    run_folder: str | Path | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Tracker:
    """The tracker for this process: MLflow on rank 0, nothing elsewhere.

    run_folder: metrics also go to `<run_folder>/logs/metrics.jsonl` (rank 0, tracking on or off).
    parent_run_id: the pipeline's run (see `start_parent_run`); the new run is its child.
    resume_run_id: the run id saved in the checkpoint being resumed.
    """
    if rank != 0:
        return NullTracker()
    metrics_path = Path(run_folder) / "logs" / "metrics.jsonl" if run_folder is not None else None
    if not cfg.enabled:
        return MetricsFileTracker(metrics_path) if metrics_path is not None else NullTracker()
    uri = tracking_uri_for(workdir, cfg)
    tracker = MlflowTracker(uri, cfg, run_name, parent_run_id, resume_run_id, metrics_path, tags)
    # A new run's id is needed at once (checkpoints, child runs); a dead server must not hang us.
    if tracker.run_id is None and not tracker.wait_until_started(cfg.start_timeout_s):
        log.warning(
            "tracking: no MLflow run after %.0f s; training starts anyway", cfg.start_timeout_s
        )
    return tracker


def start_parent_run(
    cfg: TrackingConfig,
    workdir: str | Path,
    rank: int,
    pipeline_name: str,
    resume_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Tracker:
    """The run of one pipeline invocation; pass its `run_id` as parent_run_id to each stage."""
    parent_tags = {"detrforge.kind": "pipeline", **(tags or {})}
    return build_tracker(
        cfg, workdir, rank, pipeline_name, resume_run_id=resume_run_id, tags=parent_tags
    )
