"""Experiment tracking: one `Tracker` interface; an MLflow tracker that never blocks training.

Only rank 0 logs. Every `log_metrics` call is first appended to `<run_folder>/logs/metrics.jsonl`
(local disk, so nothing is lost), then queued for MLflow. A background thread sends the queue in
batches with a short HTTP timeout; when the server is down it warns, keeps the newest metrics
(bounded) and resends them when the server is back. A step never waits on the network.

This package is the library's only code that imports mlflow, lazily through `import_mlflow`
(`pipeline/registry.py` reaches MLflow through it too). Its modules: `base` (config, the
`Tracker` interface, store locations, the metrics file), `sender` (the background sender and
its state machine), `mlflow_tracker` (the MLflow tracker and the builders), `replay` (the
replay offset of metrics.jsonl), `lineage` (dataset inputs, parent versions, descriptions).

    parent = start_parent_run(cfg, workdir, rank, "demo")  # once per pipeline invocation
    tracker = build_tracker(cfg, workdir, rank, "detr_pretrain", parent_run_id=parent.run_id,
                            resume_run_id=saved_run_id, run_folder=run_folder)
    tracker.log_metrics({"loss": 0.7}, step=100)  # returns at once
    tracker.finish()  # "FAILED" / "KILLED" (preempted; a resume re-attaches) otherwise
"""

from pipeline.tracking.base import (
    DESCRIPTION_TAG,
    PARENT_RUN_TAG,
    RUN_STATUSES,
    UI_ENV,
    MetricsFileTracker,
    NullTracker,
    Tracker,
    TrackingConfig,
    TrackingError,
    artifact_root_for,
    embedded_tracking_uri,
    experiment_artifact_location,
    flatten_params,
    import_mlflow,
    mlflow_client,
    tracking_uri_for,
    ui_command,
)
from pipeline.tracking.lineage import (
    PARENT_MODEL_TAG,
    DatasetRecord,
    parent_models,
    run_description,
    shard_datasets,
    version_description,
)
from pipeline.tracking.mlflow_tracker import (
    MlflowTracker,
    build_tracker,
    recorded_run_id,
    start_parent_run,
)
from pipeline.tracking.replay import send_unsent
from pipeline.tracking.sender import is_transient

_is_transient = is_transient  # the name tests and older callers import

__all__ = [
    "DESCRIPTION_TAG", "PARENT_MODEL_TAG", "UI_ENV", "DatasetRecord", "parent_models",
    "recorded_run_id", "run_description", "send_unsent", "shard_datasets", "version_description",
    "PARENT_RUN_TAG", "RUN_STATUSES", "MetricsFileTracker", "MlflowTracker", "NullTracker",
    "Tracker", "TrackingConfig", "TrackingError", "artifact_root_for", "build_tracker",
    "embedded_tracking_uri", "experiment_artifact_location", "flatten_params", "import_mlflow",
    "is_transient", "mlflow_client", "start_parent_run", "tracking_uri_for", "ui_command",
]
