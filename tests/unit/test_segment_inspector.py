"""The stage inspector hook on a segmenter: the val loader's thing labels mapped by category id
into the segmenter's things + stuff classes, queries with masks; the eval section's checks."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.data.panoptic_view import PanopticView
from pipeline.eval.segmentation import SegmentationEvalConfig
from pipeline.inference.model_io import ModelSpec
from pipeline.losses.set_criterion import CriterionConfig
from pipeline.models import BackboneConfig, DetectorConfig
from pipeline.models.mask_head import SegmenterConfig, build_segmenter
from stages.detection_common import inspector_hook
from stages.segment_finetune import segmenter_labels

# The segmenter's classes: the shards' things (ids 4, 1) first, then stuff (id 30).
VIEW = PanopticView(({"id": 4, "name": "tent", "isthing": 1}, {"id": 1, "name": "ball", "isthing": 1},
                     {"id": 30, "name": "grass", "isthing": 0}), {})
# The val shards' categories in their own order, one of them unknown to the segmenter.
VAL_CATEGORIES = [{"id": 1, "name": "ball"}, {"id": 4, "name": "tent"}, {"id": 8, "name": "kite"}]


def test_val_labels_map_by_category_id_into_things_and_stuff():
    assert segmenter_labels(VAL_CATEGORIES, VIEW) == [1, 0, None]


def test_segmenter_hook_names_ground_truth_by_segmenter_classes(tmp_path):
    torch.manual_seed(0)
    detector = DetectorConfig(num_classes=3, num_queries=6, hidden_dim=32, enc_layers=1, dec_layers=2,
                              nheads=4, dim_feedforward=64, dropout=0.0, two_stage=True, box_refine=True,
                              backbone=BackboneConfig(name="resnet18", out_strides=[8, 16, 32]))
    cfg = SegmenterConfig(detector=detector, mask_head={"mask_dim": 16})
    names = [c["name"] for c in VIEW.categories]
    spec = ModelSpec("segmenter", cfg, names, list(VIEW.categories), eval_size=96, max_size=128)
    hook = inspector_hook(tmp_path / "inspect", spec, CriterionConfig(), SegmentationEvalConfig(),
                          segmenter_labels(VAL_CATEGORIES, VIEW))
    # val labels 0 (ball), 1 (tent), 2 (kite: no segmenter class, left out of the rows)
    target = {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.1, 0.1]]),
              "labels": torch.tensor([0, 1, 2]), "size": torch.tensor([96, 128])}
    batch = {"images": torch.randint(0, 255, (1, 3, 96, 128), dtype=torch.uint8), "targets": [target]}
    hook(build_segmenter(cfg), batch)
    summary = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    rows = summary["images"][0]["ground_truth"]
    assert [(r["name"], r["label"], r["annotation_id"]) for r in rows] == [("ball", 1, 0), ("tent", 0, 1)]
    assert all("mask_area" in q for q in summary["images"][0]["queries"])
    assert (tmp_path / "inspect" / "report.html").is_file()


@pytest.mark.parametrize("bad", [{"inspect_images": -1}, {"picture_score": 1.5}])
def test_segmentation_eval_rejects_bad_inspector_settings(bad):
    with pytest.raises(ValueError, match="eval.inspect_images"):
        SegmentationEvalConfig(**bad)
