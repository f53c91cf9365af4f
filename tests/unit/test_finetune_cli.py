"""`detrforge finetune`'s front: the --minutes budget reads the pretrained run's step time, the
default name comes from the data set's folder."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

from launch.finetune_cli import default_name, plan
from pipeline.finetune_data import CocoSplit


def _train_split(tmp_path: Path) -> CocoSplit:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 100} for i in range(1, 9)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 40, 40], "iscrowd": 0}
            for i in range(1, 9)]
    path = tmp_path / "roadsigns" / "annotations" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "sign"}]}))
    (tmp_path / "img").mkdir()
    return CocoSplit(path, tmp_path / "img")


def test_minutes_use_the_measured_step_time_of_the_pretrained_run(tmp_path):
    train = _train_split(tmp_path)
    meta = {"pipeline": "demo", "stage": "detr",
            "config": {"data": {"batch_size": 4, "eval_size": 100}}}
    args = Namespace(minutes=1.0, steps=None)
    _, estimated = plan(args, meta, train, tmp_path)
    assert "estimated" in estimated.reasons[2]
    log = tmp_path / "demo" / "detr" / "logs" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"step": 1, "metrics": {"train/step_time_s": 0.01}}) + "\n")
    stats, measured = plan(args, meta, train, tmp_path)
    assert "measured" in measured.reasons[2] and stats.images == 8
    assert measured.max_steps != estimated.max_steps and measured.max_steps > 100


def test_default_name_is_the_data_set_folder(tmp_path):
    assert default_name(tmp_path / "road signs" / "annotations" / "train.json") == "road_signs"
    assert default_name(tmp_path / "shapes" / "train.json") == "shapes"
