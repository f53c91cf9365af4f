"""`detrforge sweep` on this machine: the tiny detector over two learning rates, a few steps each.

The points run one after another as stage instances of the recipe's one-stage pipeline; the
sweep writes its table, plot and record, tracks the points as children of one MLflow parent run
with their overrides as params, promotes the best point, and a second call runs nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "stages" / "detr_pretrain" / "tiny.yaml"
pytestmark = [pytest.mark.timeout(600)]
TINY = ["model.num_queries=10", "model.hidden_dim=32", "model.enc_layers=1", "model.dec_layers=1",
        "model.dim_feedforward=64", "model.backbone.name=resnet10t", "data.train_scales=[64]",
        "data.eval_size=64", "data.max_size=96", "data.batch_size=2", "data.num_workers=0",
        "data.shuffle_buffer=16", "eval.pictures=1", "train.max_steps=3",
        "train.checkpoint_every=2", "train.progress_bar=false"]


def sweep(workdir: Path, samples: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "detrforge"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(exe), "sweep", str(RECIPE), "--stage", "tiny",
                           "--grid", "optim.lr=1e-4,4e-4", "--workdir", str(workdir),
                           f"data.shards={samples}/detect", *TINY, *extra],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=500)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from pipeline.data.samples import make_samples

    root = tmp_path_factory.mktemp("sweep")
    make_samples(root / "samples", size="tiny", seed=0)
    first = sweep(root / "work", root / "samples", "--promote-best", "best")
    second = sweep(root / "work", root / "samples")
    return root / "work", first, second


def test_sweep_runs_each_point_as_a_stage_and_reports(swept):
    workdir, first, _ = swept
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    names = ["tiny.lr_1e-4", "tiny.lr_4e-4"]
    for name in names:
        done = json.loads((workdir / "tiny" / name / "DONE.json").read_text())
        assert done["stage"] == name
        assert "lr: 0.0001" in (workdir / "tiny" / "tiny.lr_1e-4" / "config.yaml").read_text()
    folder = workdir / "tiny" / "sweeps" / "tiny"
    record = json.loads((folder / "sweep.json").read_text())
    assert sorted(r["point"] for r in record["rows"]) == names
    values = [r["value"] for r in record["rows"]]
    assert values == sorted(values, reverse=True)  # best first
    assert (folder / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    table = (folder / "table.md").read_text()
    assert table.startswith("| point | optim.lr | seed | AP |") and table.count("| done |") == 2
    best = record["rows"][0]["point"]
    assert f"tiny.{best}@best -> version 1" in first.stdout


def test_points_are_children_of_one_parent_with_their_overrides(swept):
    from mlflow import MlflowClient

    workdir, _, _ = swept
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent_id = json.loads((workdir / "tiny" / "sweeps" / "tiny" / "sweep.json").read_text())[
        "parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.params["sweep.optim.lr"] == "1e-4,4e-4"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    lrs = sorted(float(run.data.params["optim.lr"]) for run in children)
    assert lrs == [1e-4, 4e-4]


def test_second_sweep_skips_the_finished_points(swept):
    _, _, second = swept
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "2 points, 2 done, 0 to run" in second.stdout
    assert "=== stage" not in second.stdout
