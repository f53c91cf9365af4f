"""MLflow read as its users read it: a tiny two-stage pipeline, then `detrforge ui`'s light
viewer driven by a real headless Chromium. The experiment opens in the model-training view with
the stage runs, a run's eval metric is a curve, the registered version shows its description.

Screenshots are kept under .cache/test-artifacts/mlflow_ui/ (CI keeps them as artifacts).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pipeline.tracking import mlflow_client, tracking_uri_for
from pipeline.tracking.viewer import Viewer
from tests.integration.test_pipeline import DETR_FAST, STAGES, detrforge

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".cache" / "test-artifacts" / "mlflow_ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STEPS = ["train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=4",
         "train.progress_bar=false", "train.log_every=1"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (make test installs it)")


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory):
    """A detection stage and a fine-tuning stage from it, 4 steps each, evaluated twice."""
    from pipeline.data.samples import make_samples

    tmp = tmp_path_factory.mktemp("ui")
    samples = tmp / "samples"
    make_samples(samples, size="tiny", seed=0)
    pipeline = {"name": "uipipe", "stages": [
        {"name": "detr", "recipe": str(STAGES / "detr_pretrain/tiny.yaml"),
         "overrides": [f"data.shards={samples}/detect", "backbone_init=null", *DETR_FAST,
                       *STEPS]},
        {"name": "domain", "recipe": str(STAGES / "domain_finetune/tiny.yaml"),
         "overrides": [f"data.shards={samples}/domain", "init_from=stage:detr", *DETR_FAST,
                       *STEPS]},
    ]}
    (tmp / "pipe.yaml").write_text(json.dumps(pipeline))
    done = detrforge("run", str(tmp / "pipe.yaml"), "--workdir", str(tmp / "work"), cwd=tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / "work"


@pytest.fixture(scope="module")
def viewer(finished_pipeline):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = Viewer(finished_pipeline, port=_free_port(), log_path=ARTIFACTS / "server.log")
    try:
        seconds = started.wait_ready(timeout_s=120)
        (ARTIFACTS / "viewer.json").write_text(json.dumps(
            {"seconds_to_ready": round(seconds, 2), "rss_mib": round(started.rss_mib(), 1)}))
        yield started
    finally:
        started.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def browse(url: str, name: str, needle: str, budget_ms: int = 25000) -> str:
    """The page's DOM once it shows `needle` (up to three loads, each with `budget_ms` of virtual
    time: charts load lazily); a screenshot in ARTIFACTS/<name>.png."""
    with tempfile.TemporaryDirectory() as profile:
        base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,900",
                f"--virtual-time-budget={budget_ms}"]
        subprocess.run([*base, f"--screenshot={ARTIFACTS / (name + '.png')}", url],
                       capture_output=True, timeout=180, check=False)
        for _ in range(3):
            dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                                 timeout=180, check=False).stdout
            if needle in dom:
                break
    (ARTIFACTS / f"{name}.html").write_text(dom)
    return dom


def _runs(workdir: Path):
    client = mlflow_client(tracking_uri_for(workdir))
    experiment = client.get_experiment_by_name("detrforge")
    return client, experiment, {r.info.run_name: r for r in client.search_runs(
        [experiment.experiment_id])}


def test_store_holds_training_runs_with_curves_and_lineage(finished_pipeline):
    client, experiment, runs = _runs(finished_pipeline)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    detr, domain = runs["detr"], runs["domain"]
    ap = [m.step for m in client.get_metric_history(detr.info.run_id, "eval/AP")]
    assert sorted(ap) == [2, 4]  # a curve, not a dot
    # The pictures of each evaluation, logged when it happened, and the last ones at the end.
    logged = {a.path for a in client.list_artifacts(detr.info.run_id, "artifacts/evaluations")}
    assert logged == {"artifacts/evaluations/step_000002", "artifacts/evaluations/step_000004"}
    pictures = client.list_artifacts(detr.info.run_id,
                                     "artifacts/evaluations/step_000002/predictions")
    assert any(a.path.endswith(".png") for a in pictures)
    assert client.list_artifacts(detr.info.run_id, "artifacts/predictions")
    assert "eval/APl" not in detr.data.metrics or detr.data.metrics["eval/APl"] != -1
    assert any(k.startswith("train/lr/") for k in detr.data.metrics)
    assert {"train/loss_ce", "train/loss_bbox", "train/loss_giou"} <= set(detr.data.metrics)
    assert "Stage `domain`" in domain.data.tags["mlflow.note.content"]
    assert domain.data.tags["detrforge.parent_model"] == "uipipe.detr/1"
    inputs = {d.dataset.name: d for d in domain.inputs.dataset_inputs}
    assert {"domain/train", "domain/val"} <= set(inputs)
    assert json.loads(inputs["domain/train"].dataset.profile)["num_samples"] > 0
    version = client.get_model_version("uipipe.domain", "1")
    assert "uipipe.detr/1" in version.description and "Config hash" in version.description
    assert client.get_registered_model("uipipe.domain").tags["detrforge.stage"] == "domain"


def test_viewer_pages_in_headless_chromium(finished_pipeline, viewer):
    _, experiment, runs = _runs(finished_pipeline)
    base = f"{viewer.url}/#/experiments/{experiment.experiment_id}"
    # A fresh browser opens MLflow in its GenAI mode; the experiment-kind tag still makes the
    # runs "Training runs" (untagged, they are listed as GenAI "Evaluation runs").
    default = browse(f"{base}/runs", "experiment_default_mode", "Training runs")
    assert "Training runs" in default
    training = "workflowType=machine_learning"
    link = dict(viewer.training_links(finished_pipeline))[experiment.name]  # what `ui` prints
    assert link == f"{base}/runs?{training}"
    listing = browse(link, "experiment", "matching runs")
    assert "Model training" in listing and "uipipe" in listing  # the pipeline's parent run
    assert "<strong>3</strong> matching runs" in listing  # parent + the two stages
    run = runs["detr"].info.run_id
    metric = browse(f"{base}/runs/{run}/model-metrics?{training}", "run_metrics", "(eval/AP)",
                    40000)
    assert "detr (eval/AP)" in metric  # the chart's legend; the store test counts its points
    model = browse(f"{viewer.url}/#/models/uipipe.domain/versions/1", "model_version",
                   "Export of stage")
    assert "Export of stage" in model and "uipipe.detr/1" in model
    assert (ARTIFACTS / "experiment.png").stat().st_size > 10_000
