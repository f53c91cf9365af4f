"""Rank 0's MLflow tracker (metrics.jsonl first, then MLflow through the background sender),
and the builders every stage and pipeline use: `build_tracker`, `start_parent_run`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.run_folder import RunFolder
from pipeline.tracking.base import (
    EXPERIMENT_KIND_TAG,
    MAX_PARAM_VALUE_CHARS,
    MAX_TAG_VALUE_CHARS,
    PARENT_RUN_TAG,
    TRAINING_EXPERIMENT_KIND,
    MetricsFileTracker,
    NullTracker,
    Tracker,
    TrackingConfig,
    clean_key,
    clip,
    experiment_artifact_location,
    flatten_params,
    log,
    scalar,
    tracking_uri_for,
    without_sentinels,
)
from pipeline.tracking.lineage import DatasetRecord
from pipeline.tracking.replay import SentLog, file_size, metric_items, unsent_lines
from pipeline.tracking.sender import Op, RunSender


class MlflowTracker(Tracker):
    """Rank 0's tracker: metrics.jsonl first, then MLflow through a `RunSender` thread.

    resume_run_id re-attaches to that run (same run id, metrics continue at their steps); a run
    id the store does not know starts a new run with a warning. With sent_path (the run folder's
    `logs/metrics.sent`), the run id is recorded there once the run exists, and a re-attach first
    replays the lines of metrics.jsonl that MLflow had not acknowledged.
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
        sent_path: str | Path | None = None,
    ):
        self.tracking_uri, self.cfg, self._run_name = tracking_uri, cfg, run_name
        self._parent_run_id, self._resume_run_id = parent_run_id, resume_run_id
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        self._metrics_file = MetricsFileTracker(metrics_path) if metrics_path else None
        self._finished, self._monitor = False, None
        sent_log = SentLog(sent_path) if sent_path and metrics_path else None
        replay_from = None
        if sent_log is not None and resume_run_id:
            replay_from = sent_log.read().offset  # a re-attach: send what MLflow lacks
        start = replay_from if replay_from is not None else file_size(metrics_path or "")
        self._sender = RunSender(tracking_uri, cfg, self._open_run, run_id=resume_run_id,
                                 sent_log=sent_log, sent_offset=start)
        if replay_from is not None:
            self.replayed = self._replay(Path(metrics_path), replay_from)

    replayed = 0  # metrics.jsonl lines queued again at start (a re-attach after an outage)

    def _replay(self, metrics_path: Path, offset: int) -> int:
        count = 0
        for line in unsent_lines(metrics_path, offset):
            self._sender.push(Op("metrics", metric_items(line), offset=line.end_offset))
            count += 1
        if count:
            log.warning("tracking: sending %d lines of %s that MLflow had not received",
                        count, metrics_path)
        return count

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
                self._start_system_metrics(run.info.run_id, resume=True)
                return run.info.run_id
        tags = dict(self._tags)
        if self._parent_run_id:
            tags[PARENT_RUN_TAG] = self._parent_run_id
        run = client.create_run(self._experiment_id(client), run_name=self._run_name, tags=tags)
        self._start_system_metrics(run.info.run_id, resume=False)
        return run.info.run_id

    def _start_system_metrics(self, run_id: str, resume: bool) -> None:
        """MLflow's system metrics monitor (its own thread) when the config asks for it."""
        if not self.cfg.system_metrics or self._monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(
                run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                resume_logging=resume, tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 - psutil missing, no permission: still train
            log.warning("tracking: system metrics are off (%s)", err)
            self._monitor = None

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
                return client.create_experiment(
                    name, artifact_location=location,
                    tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})
            except Exception as err:  # another stage created it between our two calls
                if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):  # made before detrforge set it
            client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
        return experiment.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten_params(params)
        items = [(clean_key(k), clip(v, MAX_PARAM_VALUE_CHARS, k)) for k, v in flat.items()]
        self._sender.push(Op("params", items))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = without_sentinels({clean_key(k): scalar(k, v) for k, v in metrics.items()})
        now = time.time()
        # The line and MLflow get the same timestamp: a replayed line is then the same metric.
        offset = None
        if self._metrics_file is not None:
            offset = self._metrics_file.log_metrics(values, step, time_s=now)
        now_ms = int(now * 1000)
        items = [(k, v, now_ms, int(step)) for k, v in values.items()]
        self._sender.push(Op("metrics", items, offset=offset))

    def log_datasets(self, datasets: list[DatasetRecord]) -> None:
        if datasets:
            self._sender.push(Op("inputs", list(datasets)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._push_artifact("artifact", Path(path), artifact_path, Path.is_file)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._push_artifact("artifacts", Path(directory), artifact_path, Path.is_dir)

    def _push_artifact(self, kind: str, path: Path, artifact_path: str | None, exists) -> None:
        if not exists(path):  # a missing file is a warning, not a reason to stop training
            log.warning("tracking: %s %s does not exist; not logged", kind, path)
            return
        self._sender.push(Op(kind, (str(path.resolve()), artifact_path)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [(clean_key(k), clip(str(v), MAX_TAG_VALUE_CHARS, k)) for k, v in tags.items()]
        self._sender.push(Op("tags", items))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the queue to drain, at most timeout_s (None: cfg.finish_timeout_s)."""
        return self._sender.flush(self.cfg.finish_timeout_s if timeout_s is None else timeout_s)

    def finish(self, status: str = "FINISHED") -> None:
        super().finish(status)
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()
        self._sender.push(Op("terminate", status))
        if not self._sender.close(self.cfg.finish_timeout_s):
            log.warning(
                "tracking: MLflow still unreachable after %.0f s; %d metrics were not sent "
                "(all are in logs/metrics.jsonl)", self.cfg.finish_timeout_s, self._sender.queued_metrics,
            )  # fmt: skip
        if self._metrics_file is not None:
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
    resume_run_id: the run id of the run being resumed (its checkpoint's, else
        `recorded_run_id(run_folder)`); re-attaching also replays what MLflow lacks.
    """
    if rank != 0:
        return NullTracker()
    folder = RunFolder(run_folder) if run_folder is not None else None
    metrics_path = folder.metrics_path if folder is not None else None
    if not cfg.enabled:
        return MetricsFileTracker(metrics_path) if metrics_path is not None else NullTracker()
    uri = tracking_uri_for(workdir, cfg)
    tracker = MlflowTracker(uri, cfg, run_name, parent_run_id, resume_run_id, metrics_path, tags,
                            sent_path=folder.metrics_sent_path if folder is not None else None)
    # A new run's id is needed at once (checkpoints, child runs); a dead server must not hang us.
    if tracker.run_id is None and not tracker.wait_until_started(cfg.start_timeout_s):
        log.warning(
            "tracking: no MLflow run after %.0f s; training starts anyway", cfg.start_timeout_s
        )
    return tracker


def recorded_run_id(run_folder: str | Path) -> str | None:
    """The MLflow run id the run folder recorded when its run was created (None: never was)."""
    return SentLog(RunFolder(run_folder).metrics_sent_path).read().run_id


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
