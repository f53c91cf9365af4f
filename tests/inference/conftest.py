"""Shared fixtures of the inference tests: tiny sample data and one real (tiny, 20-step) detection
stage run with MLflow on, which leaves a run folder, DONE.json, an export and a registered
version to predict, evaluate, serve and export from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "stages" / "detr_pretrain" / "tiny.yaml"
TINY_DETR = ["model.num_queries=10", "model.hidden_dim=32", "model.enc_layers=1",
             "model.dec_layers=2", "model.dim_feedforward=64", "model.backbone.name=resnet10t",
             "data.train_scales=[64]", "data.eval_size=64", "data.max_size=96",
             "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=16",
             "eval.pictures=1", "train.max_steps=20", "train.checkpoint_every=10",
             "train.progress_bar=false", "train.log_every=5"]


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> Path:
    from pipeline.data.samples import make_samples

    out = tmp_path_factory.mktemp("samples")
    make_samples(out, size="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def demo_samples(tmp_path_factory) -> Path:
    """The demo's sample size: a val split where 20 steps already give AP > 0 (the tiny one
    stays at 0, which would make "equal to DONE.json" a comparison of zeros)."""
    from pipeline.data.samples import make_samples

    out = tmp_path_factory.mktemp("demo_samples")
    make_samples(out, size="small", seed=0)
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_samples) -> dict:
    """A real stage run of the tiny detr_pretrain recipe through `detrforge run` (20 steps, MLflow
    on): {"workdir", "run_dir", "export", "done", "tracking_uri", "val", "name"}."""
    from launch.cli import main
    from pipeline.tracking import tracking_uri_for

    workdir = tmp_path_factory.mktemp("work")
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the workdir's own store
    try:
        code = main(["run", str(RECIPE), f"data.shards={demo_samples}/detect", *TINY_DETR,
                     "--workdir", str(workdir)])
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
    assert code == 0
    (done_path,) = workdir.glob("*/*/DONE.json")
    run_dir = done_path.parent
    return {"workdir": workdir, "run_dir": run_dir, "export": run_dir / "export",
            "done": json.loads(done_path.read_text()), "tracking_uri": tracking_uri_for(workdir),
            "val": demo_samples / "detect" / "val", "name": f"{run_dir.parent.name}.{run_dir.name}"}


def write_tiny_export(folder: Path, samples: Path, segmenter: bool = False) -> Path:
    """An untrained tiny detector (or segmenter) export with the meta a stage writes."""
    import dataclasses

    import torch

    from pipeline.data.shards import load_shard_info
    from pipeline.export import write_export
    from pipeline.models import DetectorConfig, build_detector
    from pipeline.models.backbone import BackboneConfig
    from pipeline.models.mask_head import SegmenterConfig, build_segmenter

    categories = load_shard_info(samples / "detect" / "val").categories
    torch.manual_seed(0)
    detector = DetectorConfig(num_classes=len(categories), num_queries=10, hidden_dim=32,
                              enc_layers=1, dec_layers=2, nheads=4, dim_feedforward=64,
                              dropout=0.0, two_stage=True, box_refine=True,
                              backbone=BackboneConfig(name="resnet10t", frozen_bn=False))
    config = {"data": {"eval_size": 64, "max_size": 96, "shards": str(samples / "detect")},
              "eval": {"top_k": 100}, "criterion": {"matcher": {"focal": True}}}
    if segmenter:
        cfg = SegmenterConfig(detector=detector, mask_head={"mask_dim": 16})
        model = build_segmenter(cfg)
        meta = {"kind": "segmenter", "segmenter": dataclasses.asdict(cfg)}
    else:
        model = build_detector(detector)
        meta = {"kind": "detector", "detector": dataclasses.asdict(detector)}
    meta.update(class_names=[str(c["name"]) for c in categories], categories=categories,
                config=config)
    write_export(folder, model.state_dict(), meta)
    return folder


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, samples) -> Path:
    return write_tiny_export(tmp_path_factory.mktemp("export") / "export", samples)


@pytest.fixture(scope="session")
def make_export(samples):
    """write_tiny_export bound to the samples: make_export(folder, segmenter=False)."""
    return lambda folder, segmenter=False: write_tiny_export(folder, samples, segmenter)
