"""Training pictures (ground truth | top-k predictions, upscaled) and the stage's inspector hook."""

from __future__ import annotations

import json

import torch
from PIL import Image

from pipeline.data.detection import DetectionDataConfig
from pipeline.eval.detection import DetectionEvalConfig, truth_pixels
from pipeline.eval.pictures import draw_truth_and_predictions
from pipeline.inference.model_io import ModelSpec
from pipeline.losses.set_criterion import CriterionConfig
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from stages.detection_common import inspector_hook

NAMES = ["ball", "box", "tent"]


def targets() -> list[dict]:
    return [{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "labels": torch.tensor([1]),
             "size": torch.tensor([96, 128])}]


def test_truth_and_low_score_predictions_side_by_side_upscaled(tmp_path):
    images = torch.zeros(1, 3, 96, 128)
    truth = truth_pixels(targets())
    assert truth[0]["boxes"].tolist() == [[32.0, 24.0, 96.0, 72.0]]
    detections = [{"boxes": torch.tensor([[30.0, 20.0, 90.0, 70.0]]), "scores": torch.tensor([0.04]),
                   "labels": torch.tensor([1])}]
    (path,) = draw_truth_and_predictions(images, torch.tensor([[96, 128]]), truth, detections, NAMES,
                                         tmp_path, min_score=0.3)
    with Image.open(path) as picture:
        assert picture.width >= 2 * 512 and picture.height >= 384
        left, right = picture.crop((0, 0, 512, 384)), picture.crop((520, 0, 1032, 384))
        # the low-score box is drawn (orange) on the right, the ground truth (green) on the left
        assert (255, 170, 60) in {c for _, c in right.getcolors(10_000)}
        assert (40, 220, 90) in {c for _, c in left.getcolors(10_000)}


def test_stage_inspector_hook_writes_a_report(tmp_path):
    torch.manual_seed(0)
    cfg = DetectorConfig(num_classes=3, num_queries=6, hidden_dim=32, enc_layers=1, dec_layers=2,
                         nheads=4, dim_feedforward=64, dropout=0.0, two_stage=True, box_refine=True,
                         backbone=BackboneConfig(name="resnet18", out_strides=[8, 16, 32]))
    model = build_detector(cfg).eval()
    data = DetectionDataConfig(shards=str(tmp_path), eval_size=96, max_size=128)
    spec = ModelSpec("detector", cfg, NAMES, [], data.eval_size, data.max_size, focal=cfg.focal)
    hook = inspector_hook(tmp_path / "inspect", spec, CriterionConfig(), DetectionEvalConfig())
    batch = {"images": torch.randint(0, 255, (1, 3, 96, 128), dtype=torch.uint8), "targets": targets()}
    hook(model, batch)
    summary = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert [r["name"] for r in summary["images"][0]["ground_truth"]] == ["box"]
    assert (tmp_path / "inspect" / "report.html").is_file() and not model.training
