"""Tracking through a real `mlflow server`, including a server that dies mid-run and comes back."""

from __future__ import annotations

import json
import logging
import time

import pytest

from pipeline.registry import list_models, promote, register_model, resolve_model_uri
from pipeline.tracking import MlflowTracker, TrackingConfig, build_tracker, mlflow_client


@pytest.fixture(autouse=True)
def _no_user_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cfg(url: str) -> TrackingConfig:
    # No retries inside a request: the sender's own retry loop is what is under test.
    return TrackingConfig(
        tracking_uri=url,
        experiment="server",
        http_timeout_s=2,
        http_max_retries=0,
        retry_interval_s=0.2,
        max_retry_interval_s=0.5,
        finish_timeout_s=20.0,
    )


def _steps(url: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow_client(url).get_metric_history(run_id, key))


def test_logging_and_registry_through_the_server(mlflow_server, tmp_path):
    url = mlflow_server.url
    tracker = build_tracker(_cfg(url), tmp_path / "runs", 0, "stage", run_folder=tmp_path / "stage")
    assert isinstance(tracker, MlflowTracker) and tracker.run_id
    tracker.log_params({"model": {"num_queries": 300}})
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights")
    (export / "meta.json").write_text("{}")
    version = register_model(tracker, export, "server.stage", {"git_commit": "abc"})
    tracker.finish()

    run = mlflow_client(url).get_run(tracker.run_id)
    assert run.data.params == {"model.num_queries": "300"} and run.info.status == "FINISHED"
    assert _steps(url, tracker.run_id, "loss") == [0, 1, 2]
    promote(url, "server.stage", version, "production")
    assert [(r.version, r.aliases) for r in list_models(url)] == [(1, ("latest", "production"))]
    local = resolve_model_uri("models:/server.stage@production", url, tmp_path / "download")
    assert (local / "model.safetensors").read_bytes() == b"weights"
    # Served artifacts live in the server's folder, not in the client's workdir.
    assert not (tmp_path / "runs").exists()


def test_server_killed_mid_run_then_back(mlflow_server, tmp_path, caplog):
    url, folder = mlflow_server.url, tmp_path / "stage"
    tracker = build_tracker(_cfg(url), tmp_path / "runs", 0, "outage", run_folder=folder)
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.flush(timeout_s=10) and _steps(url, tracker.run_id, "loss") == list(range(5))

    mlflow_server.kill()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        for step in range(5, 25):
            start = time.perf_counter()
            tracker.log_metrics({"loss": float(step)}, step=step)
            assert time.perf_counter() - start < 0.5
            time.sleep(0.05)  # a training step; lets the sender try (and fail) meanwhile
    assert "cannot reach MLflow" in caplog.text
    lines = (folder / "logs/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(25))

    mlflow_server.start()
    assert tracker.flush(timeout_s=20), mlflow_server.log_tail()
    tracker.finish()
    assert _steps(url, tracker.run_id, "loss") == list(range(25))
    assert mlflow_client(url).get_run(tracker.run_id).info.status == "FINISHED"
    assert tracker.dropped_metrics == 0
