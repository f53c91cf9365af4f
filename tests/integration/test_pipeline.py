"""A tiny pipeline end to end through the real CLI: three stages (one on 2 DeepSpeed ranks),
run folders, MLflow parent/child runs, registered versions, the stage cache and models:/ inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ROOT / "configs" / "stages"
FAST = ["train.max_steps=3", "train.checkpoint_every=2", "train.progress_bar=false",
        "train.log_every=1"]
DETR_FAST = ["model.num_queries=10", "model.hidden_dim=32", "model.enc_layers=1",
             "model.dec_layers=1", "model.dim_feedforward=64", "model.backbone.name=resnet10t",
             "data.train_scales=[64]", "data.eval_size=64", "data.max_size=96",
             "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=16",
             "eval.pictures=1"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from pipeline.data.samples import make_samples

    out = tmp_path_factory.mktemp("samples")
    make_samples(out, size="tiny", seed=0)
    return out


def write_pipeline(path: Path, samples: Path, name: str = "tinypipe") -> Path:
    def stage(stage_name, recipe, overrides, processes=None):
        entry = {"name": stage_name, "recipe": str(STAGES / recipe), "overrides": overrides}
        if processes:
            entry["processes"] = processes
        return entry

    pipeline = {"name": name, "stages": [
        stage("backbone", "backbone_pretrain/tiny.yaml",
              [f"data.shards={samples}/classify", "model.name=resnet10t", "data.image_size=32",
               "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
               "strategy.kind=deepspeed",
               "strategy.zero_stage=2", *FAST], processes=2),
        stage("detr", "detr_pretrain/tiny.yaml",
              [f"data.shards={samples}/detect", "backbone_init=stage:backbone", *DETR_FAST, *FAST]),
        stage("domain", "domain_finetune/tiny.yaml",
              [f"data.shards={samples}/domain", "init_from=stage:detr", *DETR_FAST, *FAST]),
    ]}
    path.write_text(json.dumps(pipeline))  # JSON is YAML
    return path


def detrforge(*args, cwd: Path, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "detrforge"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=900)


@pytest.mark.dist
def test_tiny_pipeline_end_to_end(tmp_path, samples):
    pipeline_file = write_pipeline(tmp_path / "pipe.yaml", samples)
    workdir = tmp_path / "work"
    scratch = tmp_path / "system_tmp"
    scratch.mkdir()
    first = detrforge("run", str(pipeline_file), "--workdir", str(workdir), cwd=tmp_path,
                      tmpdir=scratch)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # torch.distributed.run's per-run folder lives in the 2-process stage's run folder, not in
    # the system's temporary folder (one left behind per run before).
    assert (workdir / "tinypipe/backbone/logs/torchrun").is_dir()
    assert not list(scratch.glob("torchelastic_*")), sorted(p.name for p in scratch.iterdir())

    for stage in ("backbone", "detr", "domain"):
        run_dir = workdir / "tinypipe" / stage
        for name in ("config.yaml", "latest", "export/model.safetensors", "export/meta.json",
                     "DONE.json", "logs/metrics.jsonl"):
            assert (run_dir / name).exists(), f"{stage}: {name} missing"
        done = json.loads((run_dir / "DONE.json").read_text())
        assert done["model_version"] == 1 and done["mlflow_run_id"]
    assert "AP" in json.loads((workdir / "tinypipe/detr/DONE.json").read_text())["metrics"]
    assert "initialised model weights from" in first.stdout  # domain: partial load report

    from mlflow import MlflowClient

    uri = "sqlite:///" + str(workdir / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 3 and len(runs) == 4
    assert all(any(k.startswith("train/") for k in r.data.metrics) for r in children)
    for stage in ("backbone", "detr", "domain"):
        version = client.get_model_version_by_alias(f"tinypipe.{stage}", "latest")
        assert int(version.version) == 1
        assert version.tags["config_hash"]

    second = detrforge("run", str(pipeline_file), "--workdir", str(workdir), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped (up to date)") == 3
    assert "=== stage" not in second.stdout

    status = detrforge("status", str(pipeline_file), "--workdir", str(workdir), cwd=tmp_path)
    assert status.returncode == 0 and status.stdout.count(" done ") == 3

    # A fine-tuning recipe may start from a registered model.
    recipe = tmp_path / "from_registry.yaml"
    recipe.write_text(f"base: {STAGES / 'domain_finetune' / 'tiny.yaml'}\n"
                      "init_from: models:/tinypipe.detr@latest\n")
    third = detrforge("run", str(recipe), f"data.shards={samples}/domain", *DETR_FAST, *FAST,
                      "--workdir", str(workdir), cwd=tmp_path)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "initialised model weights from" in third.stdout
