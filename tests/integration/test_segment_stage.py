"""The segment_finetune stage end to end on the tiny generated samples: a detector export is
loaded partially (the mask head is new, the class head grows to things + stuff), a few steps
train, evaluation reports segm AP, PQ and mIoU, pictures, the inspector report (ground truth
named by the segmenter's classes, each query's mask) and the export are written."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.config import load_config
from pipeline.data.samples import make_samples
from pipeline.export import write_export
from pipeline.models import build_detector
from stages import segment_finetune
from stages.common import StageContext

RECIPE = "configs/stages/segment_finetune/tiny.yaml"


@pytest.mark.slow
def test_segment_stage_from_a_detector_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_samples(tmp_path / "samples", "tiny")
    shards = tmp_path / "samples" / "detect"
    base = load_config(RECIPE, segment_finetune.Config, [f"data.shards={shards}"], ignore_keys=("stage",))
    detector = build_detector(dataclasses.replace(base.model.detector, num_classes=7))  # the 7 thing classes
    write_export(tmp_path / "detr_export", detector.state_dict(), {"kind": "detector"})
    cfg = load_config(RECIPE, segment_finetune.Config, [
        f"data.shards={shards}", f"init_from={tmp_path / 'detr_export'}", "train.max_steps=3",
        "train.progress_bar=false", "train.log_every=1", "tracking.enabled=false", "data.num_workers=0",
        "data.batch_size=2", "eval.pictures=2",
    ], ignore_keys=("stage",))
    ctx = StageContext(workdir=tmp_path / "runs", pipeline="demo", stage="segment")
    result = segment_finetune.run(cfg, ctx)

    assert result.status == "done" and result.start == "init_from" and result.main_metric == "PQ"
    assert {"PQ", "PQ_th", "PQ_st", "SQ", "RQ", "mIoU", "pixel_acc", "segm_AP", "segm_AP50", "bbox_AP",
            "contested_share"} <= set(result.metrics)
    printed = capsys.readouterr().out
    assert "missing:    pixel_decoder." in printed and "missing:    mask_embed." in printed
    assert "mismatched: class_embed.0.weight" in printed  # 7 thing classes -> 10 things + stuff
    pictures = sorted((ctx.run_dir / "artifacts" / "segmentation").glob("*.png"))
    assert len(pictures) == 2
    meta = json.loads((ctx.run_dir / "export" / "meta.json").read_text())
    assert meta["kind"] == "segmenter" and len(meta["class_names"]) == 10
    assert [c["isthing"] for c in meta["categories"]] == [1] * 7 + [0] * 3

    inspect = ctx.run_dir / "artifacts" / "inspect"
    assert (inspect / "report.html").is_file()
    report = json.loads((inspect / "inspect.json").read_text())
    assert report["model"]["kind"] == "segmenter" and report["model"]["classes"] == meta["class_names"]
    assert len(report["images"]) == 2  # eval.inspect_images
    rows = [row for image in report["images"] for row in image["ground_truth"]]
    assert rows and {row["name"] for row in rows} <= set(meta["class_names"][:7])  # things only
    assert all(meta["class_names"][row["label"]] == row["name"] for row in rows)
    assert all("mask_area" in query for image in report["images"] for query in image["queries"])
    # copied with the pictures after the evaluation, as for the detection stages
    assert list((ctx.run_dir / "artifacts" / "evaluations").glob("step_*/inspect/report.html"))


def test_segment_stage_trains_a_dino_segmenter(tmp_path, monkeypatch):
    # A DINO detector under the mask head: its denoising queries predict masks too, so the
    # stage must build the DINO criterion (the plain one refuses denoising outputs).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_samples(tmp_path / "samples", "tiny")
    cfg = load_config(RECIPE, segment_finetune.Config, [
        f"data.shards={tmp_path / 'samples' / 'detect'}", "init_from=null", "model.detector.kind=dino",
        "model.detector.denoising.dn_number=8", "train.max_steps=2", "train.eval_every=0",
        "train.progress_bar=false", "tracking.enabled=false", "data.num_workers=0",
        "data.batch_size=2", "eval.pictures=0", "eval.inspect_images=0",
    ], ignore_keys=("stage",))
    ctx = StageContext(workdir=tmp_path / "runs", pipeline="demo", stage="segment")
    result = segment_finetune.run(cfg, ctx)
    assert result.status == "done" and {"PQ", "segm_AP"} <= set(result.metrics)
    logged = [json.loads(line) for line in (ctx.run_dir / "logs" / "metrics.jsonl").open()]
    assert any("train/loss" in line["metrics"] for line in logged)
