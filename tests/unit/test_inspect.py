"""The inspector on a tiny in-memory model: records, matching costs, pictures, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference.model_io import ModelSpec
from pipeline.inspect.collect import InspectConfig, matcher_for, run_image
from pipeline.inspect.ground_truth import GroundTruth, InspectError, load_ground_truth
from pipeline.inspect.inspector import InspectInput, inspect_images
from pipeline.models import BackboneConfig, DetectorConfig, build_detector
from pipeline.models.mask_head import SegmenterConfig, build_segmenter

NAMES = ["ball", "box", "tent"]
HEADS, LEVELS, POINTS, LAYERS = 4, 4, 2, 2


def detector_cfg(**overrides) -> DetectorConfig:
    values = dict(num_classes=3, num_queries=8, hidden_dim=32, enc_layers=1, dec_layers=LAYERS,
                  nheads=HEADS, enc_n_points=POINTS, dec_n_points=POINTS, dim_feedforward=64,
                  dropout=0.0, two_stage=True, box_refine=True,
                  backbone=BackboneConfig(name="resnet18", out_strides=[8, 16, 32]))
    values.update(overrides)
    return DetectorConfig(**values)


def setup(segmenter: bool = False, **overrides):
    torch.manual_seed(0)
    cfg = detector_cfg(**overrides)
    if segmenter:
        seg = SegmenterConfig(detector=cfg, mask_head={"mask_dim": 16})
        model, spec = build_segmenter(seg), ModelSpec("segmenter", seg, NAMES, eval_size=64, max_size=96)
    else:
        model = build_detector(cfg)
        spec = ModelSpec("detector", cfg, NAMES, eval_size=64, max_size=96, focal=cfg.focal)
    meta = {"config": {"criterion": {"matcher": {"cost_class": 2.0, "focal": True}}}}
    return model.eval(), spec, meta


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))


def truth() -> GroundTruth:
    return GroundTruth(torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 120.0, 90.0]]),
                       torch.tensor([0, 2]), [11, 12])


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    model, spec, meta = setup()
    out = tmp_path_factory.mktemp("inspect")
    items = [InspectInput("a.jpg", picture(0), truth()), InspectInput("b.jpg", picture(1))]
    summary = inspect_images(model, spec, meta, items, out, InspectConfig(top_k=3))
    return {"summary": summary, "out": out, "model": model, "spec": spec, "meta": meta}


def test_every_object_gets_a_row_with_the_matchers_own_costs(inspected):
    model, spec, meta = inspected["model"], inspected["spec"], inspected["meta"]
    first = inspected["summary"]["images"][0]
    rows = first["ground_truth"]
    assert [r["annotation_id"] for r in rows] == [11, 12]
    _, raw = run_image(model, spec, picture(0), torch.device("cpu"))
    matcher = matcher_for(meta, spec.focal)
    target = truth().target(128, 96)
    (pred_idx, tgt_idx), = matcher(raw, [target])
    cost = matcher.cost_matrix(raw, [target])[0]
    for q, t in zip(pred_idx.tolist(), tgt_idx.tolist()):
        assert rows[t]["matched_query"] == q
        assert rows[t]["cost"]["total"] == pytest.approx(float(cost[q, t]), abs=1e-3)
    assert sum(inspected["summary"]["verdicts"].values()) == 2
    assert inspected["summary"]["images"][1]["ground_truth"] == []


def test_queries_carry_points_per_layer_and_boxes_per_layer(inspected):
    first = inspected["summary"]["images"][0]
    shown = {q["query"] for q in first["queries"]}
    assert len(first["queries"]) >= 3 and {r["matched_query"] for r in first["ground_truth"]} <= shown
    for query in first["queries"]:
        assert len(query["layer_boxes"]) == LAYERS and query["layer_boxes"][-1] == query["box"]
        assert len(query["points"]) == LAYERS
        assert len(query["points"][-1]) == HEADS * LEVELS * POINTS
        # weights are a softmax over levels and points, per head
        per_head = [sum(p[4] for p in query["points"][-1] if p[0] == h) for h in range(HEADS)]
        assert per_head == pytest.approx([1.0] * HEADS, abs=1e-2)
    ranks = sorted(q["rank"] for q in first["queries"])
    assert ranks[:3] == [1, 2, 3]


def test_pictures_are_upscaled_and_the_report_is_self_contained(inspected):
    out = inspected["out"]
    first = inspected["summary"]["images"][0]
    with Image.open(out / first["overview"]) as overview:
        assert max(overview.size) >= 512
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "src=\"pictures/" not in page
    assert page.count('class="gt-row"') == 2 and "data:image/png;base64," in page
    assert json.loads((out / "inspect.json").read_text())["verdicts"] == inspected["summary"]["verdicts"]


def test_single_scale_detr_has_layer_boxes_but_no_points(tmp_path):
    model, spec, meta = setup(kind="detr", two_stage=False, box_refine=False)
    summary = inspect_images(model, spec, meta, [InspectInput("a.jpg", picture(), truth())], tmp_path)
    query = summary["images"][0]["queries"][0]
    assert query["points"] == [] and len(query["layer_boxes"]) == LAYERS


def test_segmenter_queries_get_masks(tmp_path):
    model, spec, meta = setup(segmenter=True)
    summary = inspect_images(model, spec, meta, [InspectInput("a.jpg", picture(), truth())], tmp_path,
                             InspectConfig(top_k=2))
    assert all("mask_area" in q for q in summary["images"][0]["queries"])


def test_coco_ground_truth_maps_categories_by_id_and_rejects_unknown(tmp_path):
    coco = {"images": [{"id": 5, "file_name": "sub/a.jpg", "width": 128, "height": 96}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 4, "bbox": [1, 2, 10, 20]},
                            {"id": 2, "image_id": 5, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}],
            "categories": [{"id": 1, "name": "ball"}, {"id": 4, "name": "tent"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    categories = [{"id": 1, "name": "ball"}, {"id": 2, "name": "box"}, {"id": 4, "name": "tent"}]
    gt = load_ground_truth(path, categories, NAMES)["a.jpg"]
    assert gt.labels.tolist() == [2] and gt.boxes_xyxy.tolist() == [[1, 2, 11, 22]]
    coco["categories"].append({"id": 9, "name": "kite"})
    path.write_text(json.dumps(coco))
    with pytest.raises(InspectError, match="gt.json: category 9"):
        load_ground_truth(path, categories, NAMES)
