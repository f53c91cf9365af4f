"""The replay offset of logs/metrics.jsonl, the run id recorded in the run folder, sentinel
metrics, the training-view experiment tag and `register_run_folder`, on a real SQLite store."""

from __future__ import annotations

import json

import pytest

from pipeline.registry import RegistryError, register_run_folder
from pipeline.run_folder import RunFolder
from pipeline.tracking import (
    MetricsFileTracker,
    TrackingConfig,
    build_tracker,
    mlflow_client,
    recorded_run_id,
    tracking_uri_for,
)
from pipeline.tracking.replay import SentLog, unsent_lines


@pytest.fixture(autouse=True)
def _no_user_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_sentinels_are_not_logged_other_minus_ones_are(tmp_path):
    tracker = MetricsFileTracker(tmp_path / "m.jsonl")
    tracker.log_metrics({"eval/APl": -1.0, "eval/AP": 0.25, "train/delta": -1.0}, step=3)
    tracker.finish()
    line = json.loads((tmp_path / "m.jsonl").read_text())
    assert line["metrics"] == {"eval/AP": 0.25, "train/delta": -1.0}


def test_unsent_lines_start_at_the_offset_and_skip_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    tracker = MetricsFileTracker(path)
    offsets = [tracker.log_metrics({"loss": float(s)}, step=s) for s in range(4)]
    tracker.finish()
    assert offsets[-1] == path.stat().st_size
    with path.open("ab") as handle:
        handle.write(b'{"step": 4, "time": 1.0, "metr')  # killed mid-write
    lines = list(unsent_lines(path, offsets[1]))
    assert [line.step for line in lines] == [2, 3]
    assert lines[-1].end_offset == offsets[-1]


def test_a_resumed_tracker_sends_what_mlflow_lacks(tmp_path):
    workdir, folder = tmp_path / "runs", RunFolder(tmp_path / "runs/p/stage")
    cfg = TrackingConfig(finish_timeout_s=20)
    first = build_tracker(cfg, workdir, 0, "stage", run_folder=folder.root)
    # The run id is in the run folder as soon as the run exists, before anything was sent.
    assert recorded_run_id(folder.root) == first.run_id
    for step in range(3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    assert first.flush(timeout_s=20)
    assert SentLog(folder.metrics_sent_path).read().offset == folder.metrics_path.stat().st_size
    # A process killed during an outage: its lines reached metrics.jsonl, never MLflow.
    first._sender.close(0)
    lost = MetricsFileTracker(folder.metrics_path)
    for step in range(3, 6):
        lost.log_metrics({"train/loss": float(step)}, step=step)
    lost.finish()

    second = build_tracker(cfg, workdir, 0, "stage", run_folder=folder.root,
                           resume_run_id=recorded_run_id(folder.root))
    assert second.run_id == first.run_id and second.replayed == 3
    second.log_metrics({"train/loss": 6.0}, step=6)
    second.finish()
    client = mlflow_client(tracking_uri_for(workdir))
    history = client.get_metric_history(first.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(7))
    assert SentLog(folder.metrics_sent_path).read().offset == folder.metrics_path.stat().st_size
    experiment = client.get_experiment_by_name("detrforge")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_new_run_does_not_replay_an_older_attempts_lines(tmp_path):
    workdir, folder = tmp_path / "runs", RunFolder(tmp_path / "runs/p/stage")
    old = MetricsFileTracker(folder.metrics_path)
    old.log_metrics({"train/loss": 9.0}, step=1)
    old.finish()
    tracker = build_tracker(TrackingConfig(), workdir, 0, "stage", run_folder=folder.root)
    tracker.finish()
    client = mlflow_client(tracking_uri_for(workdir))
    assert client.get_metric_history(tracker.run_id, "train/loss") == []


def test_register_run_folder_registers_a_finished_stage_once(tmp_path):
    workdir = tmp_path / "runs"
    folder = RunFolder(workdir / "pipe" / "detr").create()
    with pytest.raises(RegistryError, match="has not finished"):
        register_run_folder(folder.root, tracking_uri_for(workdir))
    folder.export_weights_path.write_bytes(b"weights")
    folder.export_meta_path.write_text(json.dumps({"pipeline": "pipe", "stage": "detr"}))
    done = {"stage": "detr", "config_hash": "abc123", "inputs": {}, "metrics": {"AP": 0.5},
            "main_metric": "AP", "mlflow_run_id": None, "model_version": None,
            "registered_model": None}
    folder.done_path.write_text(json.dumps(done))

    assert register_run_folder(folder.root, tracking_uri_for(workdir)) == ("pipe.detr", 1, True)
    record = json.loads(folder.done_path.read_text())
    assert record["model_version"] == 1 and record["registered_model"] == "pipe.detr"
    assert record["metrics"] == {"AP": 0.5}  # the rest of DONE.json is kept
    # Twice is harmless: the recorded version is reported, nothing new is registered.
    assert register_run_folder(folder.root, tracking_uri_for(workdir)) == ("pipe.detr", 1, False)
    version = mlflow_client(tracking_uri_for(workdir)).get_model_version("pipe.detr", "1")
    assert "AP 0.5000" in version.description and "abc123" in version.description


def _stage_finished_during_an_outage(workdir, model_version=None) -> tuple[RunFolder, str]:
    """A run folder whose stage finished while MLflow was down: steps 0-2 reached MLflow, 3-5
    only metrics.jsonl, the run was never ended, DONE.json was written."""
    folder = RunFolder(workdir / "pipe" / "detr")
    tracker = build_tracker(TrackingConfig(finish_timeout_s=20), workdir, 0, "detr",
                            run_folder=folder.root)
    for step in range(3):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    assert tracker.flush(timeout_s=20)
    tracker._sender.close(0)  # the outage: nothing more is acknowledged, the end is not sent
    lost = MetricsFileTracker(folder.metrics_path)
    for step in range(3, 6):
        lost.log_metrics({"train/loss": float(step)}, step=step)
    lost.finish()
    folder.export_dir.mkdir(parents=True, exist_ok=True)
    folder.export_weights_path.write_bytes(b"weights")
    folder.export_meta_path.write_text(json.dumps({"pipeline": "pipe", "stage": "detr"}))
    folder.done_path.write_text(json.dumps(
        {"stage": "detr", "config_hash": "abc", "inputs": {}, "metrics": {}, "main_metric": "AP",
         "mlflow_run_id": tracker.run_id, "model_version": model_version,
         "registered_model": None}))
    return folder, tracker.run_id


@pytest.mark.parametrize("model_version", [None, 7])
def test_register_run_folder_sends_the_lines_mlflow_lacks(tmp_path, model_version):
    workdir = tmp_path / "runs"
    folder, run_id = _stage_finished_during_an_outage(workdir, model_version)
    uri = tracking_uri_for(workdir)
    client = mlflow_client(uri)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2]
    assert client.get_run(run_id).info.status == "RUNNING"

    name, version, now = register_run_folder(folder.root, uri)
    assert (version, now) == ((1, True) if model_version is None else (7, False))
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(6)]
    # With their original timestamps: a later replay of the same line is the same metric.
    stamps = {json.loads(line)["step"]: int(json.loads(line)["time"] * 1000)
              for line in folder.metrics_path.read_text().splitlines()}
    assert all(m.timestamp == stamps[m.step] for m in history)
    assert SentLog(folder.metrics_sent_path).read().offset == folder.metrics_path.stat().st_size
    assert client.get_run(run_id).info.status == "FINISHED"
    register_run_folder(folder.root, uri)  # twice: nothing is sent again
    assert len(client.get_metric_history(run_id, "train/loss")) == 6
    if model_version is None:
        assert client.get_model_version("pipe.detr", "1").run_id == run_id


def test_a_metrics_file_that_cannot_be_written_is_a_warning_not_a_stop(tmp_path, caplog):
    blocked = tmp_path / "logs"
    blocked.mkdir()
    tracker = MetricsFileTracker(blocked)  # a folder where the file should be: open() fails
    assert tracker.log_metrics({"loss": 1.0}, step=1) == 0
    assert tracker.log_metrics({"loss": 2.0}, step=2) == 0
    assert sum("cannot append" in record.message for record in caplog.records) == 1
    tracker.finish()
