"""MLflow outages that also lose the stage process: a real `mlflow server` (SQLite store, one
worker) is SIGKILLed mid-stage, then the stage's whole process group is SIGKILLed while the
server is down (lines in `logs/metrics.jsonl` that MLflow never received, and the sender's
in-memory queue gone with the process). After the server restarts on the same port and store,
the same `detrforge run` resumes from the checkpoint, re-attaches to the same MLflow run and
replays the lines MLflow lacks with their original timestamps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.run_folder import RunFolder
from pipeline.tracking import mlflow_client
from tests.faults.conftest import BACKBONE_TINY, ROOT
from tests.integration.conftest import MlflowServer

# The backbone recipe at its smallest: a real stage (data, model, checkpoints, eval, export,
# registration) whose steps are short. keep_last is high so a pruned checkpoint cannot pass for
# a lost one.
OVERRIDES = ("train.max_steps=12", "train.log_every=2", "train.checkpoint_every=4",
             "train.keep_last=100", "train.eval_every=1000", "data.batch_size=8",
             "data.image_size=32", "tracking.experiment=faults", "tracking.retry_interval_s=0.2",
             "tracking.max_retry_interval_s=1.0", "tracking.finish_timeout_s=30")
WAIT_S = 600.0  # generous: the shared CI cores can be slow


def _env(url: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           # A dead server must fail a request at once; the sender's own loop retries.
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    return env


def _argv(workdir: Path, samples: Path) -> list[str]:
    """The stage on its own generated samples: a fresh clone has no data/samples."""
    exe = Path(sys.executable).parent / "detrforge"
    return [str(exe), "run", str(BACKBONE_TINY), "--workdir", str(workdir),
            f"data.shards={samples}/classify", *OVERRIDES]


def _wait_for(what: str, ready, process: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ready() until it returns something truthy (the stage must still be alive)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            pytest.fail(f"the stage exited ({process.returncode}) before {what}:\n{tail}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _sent(run: RunFolder) -> dict:
    try:
        return json.loads(run.metrics_sent_path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _lines(run: RunFolder) -> list[dict]:
    text = run.metrics_path.read_bytes() if run.metrics_path.is_file() else b""
    return [json.loads(raw) for raw in text.split(b"\n") if raw.strip()]


def _unsent_lines(run: RunFolder) -> list[dict]:
    """The complete lines of metrics.jsonl after the offset MLflow acknowledged."""
    if not run.metrics_path.is_file():
        return []
    data = run.metrics_path.read_bytes()[_sent(run).get("offset", 0):]
    return [json.loads(raw) for raw in data.split(b"\n")[:-1] if raw.strip()]


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the stage and its children (the stage process, data workers): a lost node."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.folder.mkdir()
    server.start(timeout_s=WAIT_S)
    yield server
    server.kill()


def test_server_and_stage_killed_during_the_outage_lose_no_metric(server, tmp_path):
    from pipeline.data.samples import make_samples

    samples = tmp_path / "samples"
    make_samples(samples, size="tiny", seed=0)
    workdir = tmp_path / "runs"
    run = RunFolder(workdir / "tiny" / "tiny")
    log_path = tmp_path / "first.log"
    log = log_path.open("wb")
    first = subprocess.Popen(_argv(workdir, samples), cwd=ROOT, env=_env(server.url), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The run exists and MLflow acknowledged some lines: then the server dies.
        acked = _wait_for("MLflow acknowledged a line",
                          lambda: _sent(run) if _sent(run).get("offset") else None, first, log_path)
        server.kill()
        # Steps go on during the outage: lines MLflow never got, and a complete checkpoint.
        _wait_for("unsent lines and a complete checkpoint",
                  lambda: len(_unsent_lines(run)) >= 2 and run.complete_step_dirs(), first, log_path)
        _kill_group(first)
    finally:
        if first.poll() is None:
            _kill_group(first)
        log.close()
    unsent = _unsent_lines(run)
    kept = {path.name for path in run.complete_step_dirs()}
    assert len(unsent) >= 2 and kept and not run.done_path.exists()
    assert _sent(run)["run_id"] == acked["run_id"]

    server.start(timeout_s=WAIT_S)
    second = subprocess.run(_argv(workdir, samples), cwd=ROOT, env=_env(server.url), capture_output=True,
                            text=True, timeout=WAIT_S)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "that MLflow had not received" in second.stderr, second.stderr[-3000:]

    run_id = acked["run_id"]
    done = json.loads(run.done_path.read_text())
    assert done["mlflow_run_id"] == run_id and done["model_version"] == 1
    assert json.loads((run.root / "result.json").read_text())["start"] == "resume"
    client = mlflow_client(server.url)
    experiment = client.get_experiment_by_name("faults")
    stage_runs = [r for r in client.search_runs([experiment.experiment_id])
                  if r.data.tags.get("detrforge.kind") != "pipeline"]
    assert [r.info.run_id for r in stage_runs] == [run_id]  # re-attached, no new run
    assert stage_runs[0].info.status == "FINISHED"

    history = client.get_metric_history(run_id, "train/loss")
    logged = {line["step"] for line in _lines(run) if "train/loss" in line["metrics"]}
    assert logged == set(range(2, 13, 2))  # the file itself has no gap
    assert {m.step for m in history} == logged  # nor MLflow
    # The lines written during the outage reached MLflow as they were (replayed, not retrained).
    received = {(m.step, m.timestamp, m.value) for m in history}
    for line in unsent:
        stamp = int(float(line["time"]) * 1000)
        assert (line["step"], stamp, line["metrics"]["train/loss"]) in received, line
    # No complete checkpoint was lost.
    assert kept <= {path.name for path in run.complete_step_dirs()}
