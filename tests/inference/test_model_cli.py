"""detrforge predict / eval / export through the CLI's main()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.cli import main
from pipeline.inference.evaluate import Harness
from pipeline.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]


def test_predict_writes_results_and_pictures_and_skips_a_corrupt_image(tiny_export, samples,
                                                                       tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (80, 60), (120, 30, 200)).save(images / "a.png")
    (images / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    code = main(["predict", str(tiny_export), str(images), "--out", str(tmp_path / "out"),
                 "--score-threshold", "0", "--top-k", "3"])
    captured = capsys.readouterr()
    assert code == 1 and "skipped" in captured.err and "b.jpg" in captured.err
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(records) == 3 and records[0]["file_name"].endswith("a.png")
    assert {"image_id", "category_id", "bbox", "score"} <= set(records[0])
    assert len(list((tmp_path / "out" / "pictures").glob("*.png"))) == 1


def test_eval_on_a_split_equals_the_stage_evaluation(tiny_export, samples, tmp_path, capsys):
    from pipeline.data.detection import DetectionDataConfig, build_detection_loader
    from pipeline.data.shards import load_shard_info
    from stages.detection_common import DetectionEvalConfig, coco_evaluate

    split = samples / "detect" / "val"
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_export), "--data", str(split), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["metrics"]) == 12 and set(report["per_class_AP"]) <= {
        c["name"] for c in load_shard_info(split).categories}
    assert "AP50" in capsys.readouterr().out
    cfg = DetectionDataConfig(shards=str(samples / "detect"), eval_size=64, max_size=96)
    evaluate = coco_evaluate(build_detection_loader(cfg, "val"), load_shard_info(split).annotation_path,
                             True, DetectionEvalConfig(pictures=0), None)
    assert report["metrics"] == evaluate(Harness(Predictor.from_export(tiny_export)))


def test_eval_of_the_train_split_scores_every_image_once_without_augmentation(
        tiny_export, samples, tmp_path, monkeypatch):
    """A split folder named `train` is evaluated like any other: the stage's training stream
    (shuffled, an epoch of whole batches, random resize) would score a random subset of images
    at random scales, and two runs would differ."""
    from pipeline.data.shards import load_shard_info
    from pipeline.eval.coco import CocoEvaluator

    scored: list[set[int]] = []
    summarize = CocoEvaluator.summarize

    def recording_summarize(self):
        scored.append(set(self.records_by_image))
        return summarize(self)

    monkeypatch.setattr(CocoEvaluator, "summarize", recording_summarize)
    split = samples / "detect" / "train"
    reports = []
    for name in ("a.json", "b.json"):
        assert main(["eval", str(tiny_export), "--data", str(split), "--out", str(tmp_path / name)]) == 0
        reports.append(json.loads((tmp_path / name).read_text())["metrics"])
    # the sample sets number their images 1..N
    assert scored[0] == scored[1] == set(range(1, load_shard_info(split).num_samples + 1))
    assert reports[0] == reports[1]


def test_export_from_a_single_process_checkpoint(tiny_export, tmp_path):
    run = tmp_path / "pipe" / "detr"
    step = run / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    weights = load_file(str(tiny_export / "model.safetensors"))
    torch.save({"model": weights}, step / "single_strategy.pt")
    (step / "COMPLETE").write_text("4\n")
    (run / "latest").write_text("step_4\n")
    with pytest.raises(Exception, match="missing meta.json|no `latest`|not a complete"):
        Predictor.from_export(run)
    (run / "export").mkdir()
    (run / "export" / "meta.json").write_text((tiny_export / "meta.json").read_text())
    assert main(["export", str(run)]) == 0
    exported = run / "export_step_4"
    assert torch.equal(load_file(str(exported / "model.safetensors"))["class_embed.0.weight"],
                       weights["class_embed.0.weight"])
    assert Predictor.from_export(exported).predict(torch.zeros(64, 80, 3, dtype=torch.uint8).numpy())
    assert main(["export", str(run), "--step", "3"]) == 2


@pytest.mark.dist
def test_export_from_a_zero3_checkpoint_of_two_ranks(tmp_path):
    env_py = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(ROOT / "tests" / "integration" / "zero_worker.py"), "--run-dir", str(tmp_path / "run"),
              "--zero-stage", "3", "--max-steps", "4", "--save-every", "2"]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(env_py, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "ours")]) == 0
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


def test_eval_of_a_segmenter_reports_segm_ap_pq_and_miou(make_export, samples, tmp_path, capsys):
    export = make_export(tmp_path / "segmenter", segmenter=True)
    out = tmp_path / "eval.json"
    assert main(["eval", str(export), "--data", str(samples / "detect" / "val"),
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    for key in ("PQ", "PQ_th", "PQ_st", "mIoU"):
        assert key in metrics, sorted(metrics)
    assert any(key.startswith("segm_") for key in metrics), sorted(metrics)
    assert "PQ" in capsys.readouterr().out
