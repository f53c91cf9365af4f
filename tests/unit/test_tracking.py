"""Tracking and registry against real SQLite stores in tmp_path (no server, no network)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.model_cache import cached_model, workdir_model_cache
from pipeline.registry import (
    RegistryError,
    list_models,
    parse_model_uri,
    promote,
    register_model,
    resolve_model_uri,
)
from pipeline.tracking import (
    PARENT_RUN_TAG,
    MetricsFileTracker,
    MlflowTracker,
    NullTracker,
    TrackingConfig,
    TrackingError,
    artifact_root_for,
    build_tracker,
    embedded_tracking_uri,
    flatten_params,
    mlflow_client,
    start_parent_run,
    tracking_uri_for,
    ui_command,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_user_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """One migrated SQLite store: MLflow's 100+ schema migrations take ~6 s per new database."""
    folder = tmp_path_factory.mktemp("template")
    mlflow_client(embedded_tracking_uri(folder)).search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def new_workdir(tmp_path, template_db):
    """new_workdir(name) -> a workdir whose embedded store is a copy of the migrated template."""

    def make(name: str = "runs") -> Path:
        workdir = tmp_path / name
        workdir.mkdir()
        shutil.copyfile(template_db, workdir / "mlflow.db")
        return workdir

    return make


def _cfg(**overrides) -> TrackingConfig:
    fast = dict(retry_interval_s=0.05, max_retry_interval_s=0.2, finish_timeout_s=10.0)
    return TrackingConfig(**{**fast, **overrides})


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client(uri).get_metric_history(run_id, key))


def _export(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "meta.json").write_text(json.dumps({"payload": payload.decode()}))
    return folder


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- configuration and URIs ---------------------------------------------------------------


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="experiment"):
        TrackingConfig(experiment="")
    with pytest.raises(ValueError, match="http_timeout_s"):
        TrackingConfig(http_timeout_s=0)
    with pytest.raises(ValueError, match="max_queued_metrics"):
        TrackingConfig(max_queued_metrics=0)


def test_tracking_uri_precedence_config_then_env_then_workdir(tmp_path, monkeypatch):
    workdir = tmp_path / "runs"
    assert tracking_uri_for(workdir) == f"sqlite:///{workdir.resolve()}/mlflow.db"
    assert tracking_uri_for(workdir).startswith("sqlite:////")  # absolute: four slashes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri_for(workdir) == "http://tracking.example:5000"
    cfg = TrackingConfig(tracking_uri="http://other:5000")
    assert tracking_uri_for(workdir, cfg) == "http://other:5000"
    assert artifact_root_for(workdir) == workdir.resolve() / "mlartifacts"


def test_ui_command_serves_the_workdir_store(tmp_path):
    argv = ui_command(tmp_path / "runs", host="0.0.0.0", port=5123)
    assert argv[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert argv[argv.index("--workers") + 1] == "1"  # a local viewer, not a team server
    assert argv[argv.index("--backend-store-uri") + 1] == embedded_tracking_uri(tmp_path / "runs")
    assert argv[argv.index("--backend-store-uri") + 1].endswith("/runs/mlflow.db")
    assert (
        argv[argv.index("--artifacts-destination") + 1] == (tmp_path / "runs/mlartifacts").as_uri()
    )
    assert argv[argv.index("--port") + 1] == "5123" and argv[argv.index("--host") + 1] == "0.0.0.0"


def test_flatten_params_uses_dotted_keys():
    flat = flatten_params(
        {"model": {"dim": 256, "heads": {"n": 8}}, "lr": 1e-4, "sizes": [1, 2], "x": None}
    )
    assert flat == {
        "model.dim": "256",
        "model.heads.n": "8",
        "lr": "0.0001",
        "sizes": "[1, 2]",
        "x": "null",
    }


def test_importing_tracking_does_not_import_mlflow_and_disables_telemetry():
    code = (
        "import os, sys; import pipeline.tracking, pipeline.registry; "
        "assert 'mlflow' not in sys.modules; "
        "print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "true"


def test_only_transient_failures_are_retried():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
    from sqlalchemy.exc import OperationalError

    from pipeline.tracking import _is_transient

    assert _is_transient(MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE))
    assert _is_transient(MlflowException("API request failed"))  # INTERNAL_ERROR: 500
    assert _is_transient(ConnectionRefusedError()) and _is_transient(TimeoutError())
    assert _is_transient(OperationalError("CREATE TABLE", {}, Exception("already exists")))
    assert not _is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not _is_transient(FileNotFoundError("export/model.safetensors"))
    assert not _is_transient(ValueError("bug"))


# --- trackers against SQLite ----------------------------------------------------------------


def test_run_with_params_metrics_and_artifact_is_found_by_search_runs(tmp_path, new_workdir):
    import mlflow

    workdir = new_workdir()
    tracker = build_tracker(
        _cfg(), workdir, rank=0, run_name="detr_pretrain", run_folder=tmp_path / "stage"
    )
    assert isinstance(tracker, MlflowTracker) and tracker.run_id
    tracker.log_params({"optim": {"lr": 2e-4, "betas": [0.9, 0.999]}, "epochs": 3})
    for step in range(4):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
    (tmp_path / "config.yaml").write_text("epochs: 3\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.set_tags({"config_hash": "abc123"})
    tracker.finish()

    uri = tracking_uri_for(workdir)
    mlflow.set_tracking_uri(uri)  # the fluent API (and it sets $MLFLOW_TRACKING_URI)
    try:
        runs = mlflow.search_runs(experiment_names=["detrforge"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert [r.info.run_id for r in runs] == [tracker.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.0002", "optim.betas": "[0.9, 0.999]", "epochs": "3"}
    assert run.data.tags["config_hash"] == "abc123"
    assert _history(uri, tracker.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(4)]
    # Artifacts land in the workdir, not in the current directory.
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "config.yaml"
    assert artifact.read_text() == "epochs: 3\n"
    assert artifact.is_relative_to(artifact_root_for(workdir))
    lines = (tmp_path / "stage/logs/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]


def test_many_and_long_params_are_chunked_and_clipped(tmp_path, caplog, new_workdir):
    tracker = build_tracker(_cfg(), new_workdir(), rank=0, run_name="params")
    params = {f"p{i:03d}": i for i in range(250)}  # MLflow takes 100 per batch
    params["long"] = "x" * 7000  # MLflow keeps 6000 chars
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker.log_params(params)
        tracker.finish()
    logged = mlflow_client(tracker.tracking_uri).get_run(tracker.run_id).data.params
    assert len(logged) == 251 and logged["p249"] == "249"
    assert len(logged["long"]) == 6000 and logged["long"].endswith("[truncated]")
    assert "truncated" in caplog.text


def test_more_metrics_than_one_mlflow_batch_all_arrive(new_workdir):
    tracker = build_tracker(_cfg(), new_workdir(), 0, "wide")
    tracker.log_metrics({f"class_ap/{i}": i / 1500 for i in range(1500)}, step=1)  # limit: 1000
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    metrics = mlflow_client(tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    assert len(metrics) == 1501 and metrics["class_ap/1499"] == 1499 / 1500


def test_resume_reattaches_to_the_same_run_and_metrics_continue(tmp_path, new_workdir):
    workdir, folder = new_workdir(), tmp_path / "stage"
    first = build_tracker(_cfg(), workdir, rank=0, run_name="stage", run_folder=folder)
    for step in range(3):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finish("KILLED")  # preempted
    second = build_tracker(
        _cfg(), workdir, 0, "stage", resume_run_id=first.run_id, run_folder=folder
    )
    assert second.run_id == first.run_id
    assert (
        second.flush(10)
        and mlflow_client(second.tracking_uri).get_run(second.run_id).info.status == "RUNNING"
    )
    for step in range(3, 5):
        second.log_metrics({"loss": float(step)}, step=step)
    second.finish()
    client = mlflow_client(second.tracking_uri)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert _history(second.tracking_uri, first.run_id, "loss") == [(s, float(s)) for s in range(5)]
    assert len(client.search_runs([client.get_run(first.run_id).info.experiment_id])) == 1
    steps = [
        json.loads(line)["step"]
        for line in (folder / "logs/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 1, 2, 3, 4]


def test_a_rejected_request_is_dropped_and_does_not_block_the_queue(new_workdir, caplog):
    workdir = new_workdir()
    first = build_tracker(_cfg(), workdir, 0, "stage")
    first.log_params({"lr": 1e-4})
    first.finish("KILLED")
    again = build_tracker(_cfg(), workdir, 0, "stage", resume_run_id=first.run_id)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        again.log_params({"lr": 5e-4})  # MLflow refuses to change a logged param
        again.log_metrics({"loss": 0.5}, step=10)
        again.finish()
    assert "rejected params" in caplog.text
    assert mlflow_client(again.tracking_uri).get_run(first.run_id).data.params == {"lr": "0.0001"}
    assert _history(again.tracking_uri, first.run_id, "loss") == [(10, 0.5)]


def test_tracker_as_context_manager_marks_a_crash_failed(new_workdir):
    with pytest.raises(RuntimeError, match="boom"):
        with build_tracker(_cfg(), new_workdir(), 0, "stage") as tracker:
            raise RuntimeError("boom")
    assert mlflow_client(tracker.tracking_uri).get_run(tracker.run_id).info.status == "FAILED"


def test_resume_of_an_unknown_run_starts_a_new_one(tmp_path, caplog, new_workdir):
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker = build_tracker(_cfg(), new_workdir(), 0, "stage", resume_run_id="0" * 32)
        assert tracker.flush(10)
    assert tracker.run_id and tracker.run_id != "0" * 32
    assert "starting a new run" in caplog.text
    tracker.finish()


def test_parent_run_and_child_runs(new_workdir):
    workdir = new_workdir()
    parent = start_parent_run(_cfg(), workdir, rank=0, pipeline_name="demo")
    children = [
        build_tracker(_cfg(), workdir, 0, stage, parent_run_id=parent.run_id)
        for stage in ("a", "b")
    ]
    for child in children:
        child.finish()
    parent.finish()
    client = mlflow_client(parent.tracking_uri)
    for child in children:
        assert client.get_run(child.run_id).data.tags[PARENT_RUN_TAG] == parent.run_id
    assert PARENT_RUN_TAG not in client.get_run(parent.run_id).data.tags
    assert client.get_run(parent.run_id).data.tags["detrforge.kind"] == "pipeline"


def test_two_workdirs_never_share_runs_or_artifacts(tmp_path, new_workdir):
    trackers = [build_tracker(_cfg(), new_workdir(name), 0, name) for name in ("wd1", "wd2")]
    for tracker, name in zip(trackers, ("wd1", "wd2")):
        (tmp_path / f"{name}.txt").write_text(name)
        tracker.log_artifact(tmp_path / f"{name}.txt")
        tracker.finish()
    for tracker, name in zip(trackers, ("wd1", "wd2")):
        client = mlflow_client(tracker.tracking_uri)
        experiment = client.get_experiment_by_name("detrforge")
        assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [
            tracker.run_id
        ]
        assert list((tmp_path / name / "mlartifacts").rglob("*.txt"))[0].name == f"{name}.txt"


def test_rank_other_than_zero_gets_a_null_tracker_that_writes_nothing(tmp_path):
    workdir, folder = tmp_path / "runs", tmp_path / "stage"
    tracker = build_tracker(_cfg(), workdir, rank=1, run_name="stage", run_folder=folder)
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.set_tags({"t": "v"})
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_disabled_tracking_keeps_metrics_jsonl_on_rank_zero(tmp_path):
    folder = tmp_path / "stage"
    tracker = build_tracker(_cfg(enabled=False), tmp_path / "runs", 0, "stage", run_folder=folder)
    assert type(tracker) is MetricsFileTracker
    tracker.log_metrics({"loss": float("nan"), "acc": 0.5}, step=7)
    tracker.finish()
    line = json.loads((folder / "logs/metrics.jsonl").read_text(), parse_constant=pytest.fail)
    assert line["step"] == 7 and line["metrics"]["acc"] == 0.5
    assert math.isnan(float(line["metrics"]["loss"]))
    assert not (tmp_path / "runs").exists()


def test_non_scalar_metric_raises_a_clear_error(tmp_path):
    tracker = MetricsFileTracker(tmp_path / "m.jsonl")
    with pytest.raises(TrackingError, match="scalar"):
        tracker.log_metrics({"loss": [1.0, 2.0]}, step=0)
    with pytest.raises(TrackingError, match="status"):
        tracker.finish("DONE")


# --- an unreachable server (nothing listens on the port) --------------------------------------


def test_unreachable_server_never_blocks_and_keeps_a_bounded_queue(tmp_path, caplog):
    cfg = _cfg(
        tracking_uri=f"http://127.0.0.1:{_closed_port()}",
        http_timeout_s=1,
        http_max_retries=0,
        max_queued_metrics=10,
        start_timeout_s=0.5,
        finish_timeout_s=0.5,
    )
    folder = tmp_path / "stage"
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker = build_tracker(cfg, tmp_path / "runs", 0, "offline", run_folder=folder)
        assert tracker.run_id is None
        for step in range(20):
            start = time.perf_counter()
            tracker.log_metrics({"loss": float(step)}, step=step)
            assert time.perf_counter() - start < 0.5
        start = time.perf_counter()
        tracker.finish()
        assert time.perf_counter() - start < 3.0
    assert "cannot reach MLflow" in caplog.text
    assert tracker.dropped_metrics == 10
    lines = (folder / "logs/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(20))


# --- registry -----------------------------------------------------------------------------


def test_register_two_versions_promote_and_resolve(tmp_path, new_workdir):
    workdir = new_workdir()
    uri = tracking_uri_for(workdir)
    first = build_tracker(_cfg(), workdir, 0, "stage")
    v1 = register_model(first, _export(tmp_path / "e1", b"one"), "demo.detr", {"config_hash": "h1"})
    first.finish()
    second = build_tracker(_cfg(), workdir, 0, "stage")
    v2 = register_model(
        second, _export(tmp_path / "e2", b"two"), "demo.detr", {"config_hash": "h2"}
    )
    second.finish()
    assert (v1, v2) == (1, 2)

    promote(uri, "demo.detr", v1, "production")
    rows = list_models(uri)
    assert [(r.name, r.version, r.aliases) for r in rows] == [
        ("demo.detr", 1, ("production",)),
        ("demo.detr", 2, ("latest",)),
    ]
    assert rows[0].tags == {"config_hash": "h1"} and rows[0].run_id == first.run_id

    production = resolve_model_uri("models:/demo.detr@production", uri, tmp_path / "dl1")
    assert (production / "model.safetensors").read_bytes() == b"one"
    assert json.loads((production / "meta.json").read_text()) == {"payload": "one"}
    latest = resolve_model_uri("models:/demo.detr@latest", uri, tmp_path / "dl2")
    assert (latest / "model.safetensors").read_bytes() == b"two"
    pinned = resolve_model_uri("models:/demo.detr/1", uri, tmp_path / "dl3")
    assert (pinned / "model.safetensors").read_bytes() == b"one"


def test_cached_model_downloads_a_version_once_and_follows_a_moved_alias(tmp_path, new_workdir):
    workdir = new_workdir()
    uri = tracking_uri_for(workdir)
    for payload in (b"one", b"two"):
        tracker = build_tracker(_cfg(), workdir, 0, "stage")
        register_model(tracker, _export(tmp_path / payload.decode(), payload), "m")
        tracker.finish()
    promote(uri, "m", 1, "production")
    cache = workdir_model_cache(workdir)
    first = cached_model("models:/m@production", uri, cache)
    assert (first / "model.safetensors").read_bytes() == b"one"
    (first / "model.safetensors").write_bytes(b"marked")  # a second download would restore it
    assert cached_model("models:/m/1", uri, cache) == first
    assert (first / "model.safetensors").read_bytes() == b"marked"
    promote(uri, "m", 2, "production")
    moved = cached_model("models:/m@production", uri, cache)
    assert (moved / "model.safetensors").read_bytes() == b"two"
    (moved / "meta.json").unlink()  # a copy that lost a file is fetched again
    assert (cached_model("models:/m@production", uri, cache) / "meta.json").is_file()
    versions = sorted(p.name for p in (cache / "m").iterdir())
    assert [v.split("-")[0] for v in versions] == ["v1", "v2"], versions  # nothing partial left


def test_one_run_registering_twice_keeps_each_version_files(tmp_path, new_workdir):
    tracker = build_tracker(_cfg(), new_workdir(), 0, "stage")
    register_model(tracker, _export(tmp_path / "e1", b"one"), "m", aliases=("candidate",))
    register_model(tracker, _export(tmp_path / "e2", b"two"), "m")
    tracker.finish()
    resolved = resolve_model_uri("models:/m@candidate", tracker.tracking_uri, tmp_path / "dl")
    assert (resolved / "model.safetensors").read_bytes() == b"one"


def test_registry_errors_name_the_fix(tmp_path, new_workdir):
    workdir = new_workdir()
    uri = tracking_uri_for(workdir)
    tracker = build_tracker(_cfg(), workdir, 0, "stage")
    with pytest.raises(RegistryError, match="meta.json"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad/model.safetensors").write_bytes(b"x")
        register_model(tracker, tmp_path / "bad", "m")
    assert register_model(tracker, _export(tmp_path / "e", b"x"), "m") == 1
    tracker.finish()
    with pytest.raises(RegistryError, match="reserves the alias 'latest'"):
        promote(uri, "m", 1, "latest")
    with pytest.raises(RegistryError, match="no version 7"):
        promote(uri, "m", 7, "production")
    with pytest.raises(RegistryError, match="no alias 'production'"):
        resolve_model_uri("models:/m@production", uri, tmp_path / "dl")
    with pytest.raises(RegistryError, match="not a model URI"):
        parse_model_uri("runs:/abc/export")
    assert parse_model_uri("models:/a.b@prod") == ("a.b", None, "prod")
    assert parse_model_uri("models:/a.b/3") == ("a.b", 3, None)


def test_register_model_from_a_null_tracker_is_a_no_op(tmp_path):
    assert register_model(NullTracker(), _export(tmp_path / "e", b"x"), "m") is None


def test_registry_on_an_unreachable_server_raises_a_registry_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(RegistryError, match="listing models .* server is up"):
        list_models(uri)
    with pytest.raises(RegistryError, match="registering m "):
        register_model("0" * 32, _export(tmp_path / "e", b"x"), "m", tracking_uri=uri)


def test_register_model_non_strict_warns_when_the_server_is_down(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_closed_port()}"
    with caplog.at_level(logging.WARNING, logger="pipeline.registry"):
        version = register_model(
            "0" * 32, _export(tmp_path / "e", b"x"), "m", tracking_uri=uri, strict=False
        )
    assert version is None and "was not registered" in caplog.text
