"""`detrforge finetune` end to end on a generated COCO data set, through the CLI entry point:
doctor, cached conversion, class mapping, plan, a 4-step domain_finetune stage, per-class AP,
registration as `<name>.finetune`, and a second identical call that trains nothing; the same with
`--task segment` on the data set with instance masks (polygons and RLE), a segment_finetune stage."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from launch.cli import main
from launch.finetune_cli import newest_detector

PRETRAINED_CLASSES = ["circle", "triangle", "Square"]
NEW_CLASSES = ["square", "circle", "star"]  # two known (by name), one new


def _rle(box: list[int], size: tuple[int, int]) -> dict:
    """The RLE mask of the ellipse drawn in ``box`` (x0, y0, x1, y1) on a (width, height) image."""
    from pycocotools import mask as mask_utils

    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).ellipse(box, fill=1)
    rle = mask_utils.encode(np.asfortranarray(np.asarray(canvas, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_coco(folder: Path, split: str, count: int, seed: int, masks: bool = False) -> Path:
    """count PIL-drawn images of squares, circles and stars; COCO json in folder/annotations;
    with ``masks``, rectangles get a polygon and circles an RLE ``segmentation``."""
    rng = random.Random(seed)
    images_dir = folder / "images" / split
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        image = Image.new("RGB", (96, 80), (rng.randint(0, 80),) * 3)
        draw = ImageDraw.Draw(image)
        for k in range(2):
            label = (index + k) % 3
            w, h = rng.randint(18, 30), rng.randint(18, 30)
            x, y = rng.randint(0, 96 - w - 1), rng.randint(0, 80 - h - 1)
            color = [(230, 60, 60), (60, 230, 60), (60, 60, 230)][label]
            if label == 1:
                draw.ellipse([x, y, x + w, y + h], fill=color)
            else:
                draw.rectangle([x, y, x + w, y + h], fill=color)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": label + 1, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
            if masks:
                annotations[-1]["segmentation"] = (
                    _rle([x, y, x + w, y + h], image.size) if label == 1
                    else [[x, y, x + w, y, x + w, y + h, x, y + h]])
        name = f"{split}_{index:03d}.jpg"
        image.save(images_dir / name, quality=90)
        images.append({"id": index + 1, "file_name": name, "width": 96, "height": 80})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(NEW_CLASSES)]}
    path = folder / "annotations" / f"{split}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def write_pretrained(folder: Path) -> Path:
    """An untrained tiny detector export with the meta a detection stage writes."""
    import torch

    from pipeline.export import write_export
    from pipeline.models import DetectorConfig, build_detector
    from pipeline.models.backbone import BackboneConfig

    torch.manual_seed(0)
    detector = DetectorConfig(num_classes=3, num_queries=10, hidden_dim=32, enc_layers=1,
                              dec_layers=2, nheads=4, dim_feedforward=64, dropout=0.0,
                              two_stage=True, box_refine=True,
                              backbone=BackboneConfig(name="resnet10t", frozen_bn=False))
    config = {"data": {"eval_size": 64, "max_size": 96, "batch_size": 2, "num_workers": 0,
                       "crop_prob": 0.0},
              "optim": {"lr": 2e-4}, "strategy": {"kind": "single", "precision": "fp32"},
              "eval": {"pictures": 1}}
    meta = {"kind": "detector", "detector": dataclasses.asdict(detector),
            "class_names": PRETRAINED_CLASSES,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(PRETRAINED_CLASSES)],
            "config": config}
    write_export(folder, build_detector(detector).state_dict(), meta)
    return folder


def make_user_data(tmp_path: Path, masks: bool = False) -> dict:
    root = tmp_path / "roadsigns"
    return {"train": write_coco(root, "train", 16, 0, masks), "val": write_coco(root, "val", 8, 1, masks),
            "images": root / "images", "export": write_pretrained(tmp_path / "pretrained"),
            "workdir": tmp_path / "runs"}


@pytest.fixture
def user_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_user_data(tmp_path)


@pytest.fixture
def masked_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_user_data(tmp_path, masks=True)


def finetune_argv(data: dict, *extra: str) -> list[str]:
    return ["finetune", "--train-annotations", str(data["train"]),
            "--train-images", str(data["images"] / "train"),
            "--val-annotations", str(data["val"]), "--val-images", str(data["images"] / "val"),
            "--from", str(data["export"]), "--steps", "4", "--name", "shapes",
            "--workdir", str(data["workdir"]), "train.progress_bar=false", *extra]


def test_finetune_end_to_end_then_up_to_date(user_data, capsys):
    from pipeline.export import load_export
    from pipeline.registry import list_models
    from pipeline.tracking import tracking_uri_for

    # the README's order: check the folders, then fine-tune
    assert main(["data", "check", str(user_data["train"]), "--images",
                 str(user_data["images"] / "train"), "--val", str(user_data["val"])]) == 0
    assert main(finetune_argv(user_data)) == 0
    out = capsys.readouterr().out
    workdir = user_data["workdir"]
    folder = workdir / "shapes"
    run_dir = folder / "finetune"
    assert "converted now" in out and "2 of 3 classes keep their pretrained row" in out
    recipe = yaml.safe_load((folder / "finetune.yaml").read_text())
    assert recipe["stage"] == "domain_finetune" and recipe["train"]["max_steps"] == 4
    assert not Path(recipe["data"]["shards"]).is_absolute()  # relative to the recipe
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["registered_model"] == "shapes.finetune" and done["model_version"] == 1
    rows = list_models(tracking_uri_for(workdir))
    assert [(r.name, r.version) for r in rows] == [("shapes.finetune", 1)]
    state, meta = load_export(run_dir / "export")
    assert meta["class_names"] == NEW_CLASSES and state["class_embed.0.weight"].shape[0] == 3
    report = json.loads((folder / "per_class_ap.json").read_text())
    assert set(report["per_class_AP"]) == set(NEW_CLASSES)
    assert "class" in out and f"pictures:   {run_dir / 'artifacts' / 'predictions'}" in out
    assert list((run_dir / "artifacts" / "predictions").glob("*"))
    assert (folder / "data_check_train.md").is_file()

    finished_at = done["finished_at"]
    assert main(finetune_argv(user_data)) == 0
    out = capsys.readouterr().out
    assert "cached, nothing converted" in out
    assert "stage shapes/finetune is up to date" in out and "skipped (up to date)" in out
    assert json.loads((run_dir / "DONE.json").read_text())["finished_at"] == finished_at
    assert len(list((workdir / "datasets").iterdir())) == 1

    # the generated pipeline is an ordinary one: `detrforge run` / `status` take it as it is
    pipeline_file = str(folder / "pipeline.yaml")
    assert main(["run", pipeline_file, "--workdir", str(workdir)]) == 0
    assert main(["status", pipeline_file, "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "skipped (up to date)" in out and "finetune       done" in out
    # the default --from: the newest registered detector, never this fine-tune's own model
    assert newest_detector(workdir, "other.") == "models:/shapes.finetune/1"
    assert newest_detector(workdir, "shapes.") is None
    # --from a registered model URI: the fine-tuned classes all keep their rows this time
    assert main(finetune_argv(user_data, "--from", "models:/shapes.finetune@latest",
                              "--name", "shapes2", "--steps", "1")) == 0
    out = capsys.readouterr().out
    assert "3 of 3 classes keep their pretrained row" in out and "cached, nothing" in out
    assert [r.name for r in list_models(tracking_uri_for(workdir))] == ["shapes.finetune",
                                                                       "shapes2.finetune"]


def test_finetune_stops_on_doctor_errors(user_data, capsys):
    coco = json.loads(user_data["train"].read_text())
    coco["images"].append({"id": 999, "file_name": "nowhere.jpg", "width": 96, "height": 80})
    coco["categories"] = coco["categories"][:2]  # val lists three: the sets differ
    user_data["train"].write_text(json.dumps(coco))
    assert main(finetune_argv(user_data)) == 2
    captured = capsys.readouterr()
    assert "val_categories_differ" in captured.out and "data check found" in captured.err
    assert not (user_data["workdir"] / "datasets").exists()


def test_finetune_without_a_registered_detector_is_one_line(user_data, capsys):
    argv = finetune_argv(user_data)
    index = argv.index("--from")
    del argv[index:index + 2]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detrforge: error:") and "no registered detector" in err
    assert len(err.splitlines()) == 1


def test_finetune_segment_end_to_end_then_up_to_date(masked_data, capfd):
    from pipeline.eval.panoptic import read_panoptic_png
    from pipeline.registry import list_models
    from pipeline.tracking import tracking_uri_for

    # the README's command: the detector of --from becomes a segmenter
    assert main(finetune_argv(masked_data, "--task", "segment")) == 0
    out = capfd.readouterr().out
    workdir = masked_data["workdir"]
    folder = workdir / "shapes"
    run_dir = folder / "finetune"
    recipe = yaml.safe_load((folder / "finetune.yaml").read_text())
    assert recipe["stage"] == "segment_finetune" and recipe["train"]["max_steps"] == 4
    assert recipe["model"]["mask_head"]["mask_dim"] == 32  # the detector's hidden_dim
    assert recipe["criterion"]["masks"]["num_points"] == 14 * 14  # 64 px: 16 x 16 masks
    assert recipe["panoptic_annotations"].startswith("inputs/panoptic-")
    # the detector's weights load into the segmenter (the stage's process prints it): only the
    # mask head is new
    assert "missing:    mask_embed." in out and "0 shape-mismatched" in out
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["registered_model"] == "shapes.finetune" and done["model_version"] == 1
    assert done["main_metric"] == "PQ"
    assert {"segm_AP", "segm_AP50", "bbox_AP", "PQ", "PQ_th", "mIoU"} <= set(done["metrics"])
    assert [(r.name, r.version) for r in list_models(tracking_uri_for(workdir))] == [
        ("shapes.finetune", 1)]
    meta = json.loads((run_dir / "export" / "meta.json").read_text())
    assert meta["kind"] == "segmenter" and meta["class_names"] == NEW_CLASSES
    for line in ("segm_AP  ", "PQ  ", "mIoU  ", f"pictures:   {run_dir / 'artifacts' / 'segmentation'}",
                 "model:      models:/shapes.finetune/1"):
        assert line in out, line
    assert list((run_dir / "artifacts" / "segmentation").glob("*.png"))

    # the panoptic ground truth: one segment per val instance, the smaller on top
    panoptic_dir = folder / recipe["panoptic_annotations"]
    panoptic = json.loads((panoptic_dir / "panoptic_val.json").read_text())
    assert len(panoptic["annotations"]) == 8
    first = panoptic["annotations"][0]
    ids = read_panoptic_png(panoptic_dir / "panoptic_val" / first["file_name"])
    assert {int(v) for v in np.unique(ids)} == {0} | {s["id"] for s in first["segments_info"]}
    assert all((ids == s["id"]).sum() == s["area"] for s in first["segments_info"])

    finished_at = done["finished_at"]
    assert main(finetune_argv(masked_data, "--task", "segment")) == 0
    out = capfd.readouterr().out
    assert "cached, nothing converted" in out and "stage shapes/finetune is up to date" in out
    assert json.loads((run_dir / "DONE.json").read_text())["finished_at"] == finished_at


def test_draw_image_puts_the_smaller_of_two_overlapping_instances_on_top(tmp_path):
    from pipeline.eval.panoptic import read_panoptic_png
    from pipeline.finetune_masks import draw_image

    image = {"id": 7, "width": 20, "height": 10}
    big = {"category_id": 1, "segmentation": [[0, 0, 20, 0, 20, 10, 0, 10]]}
    small = {"category_id": 2, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]], "iscrowd": 0}
    record = draw_image(image, [small, big], tmp_path / "7.png")
    ids = read_panoptic_png(tmp_path / "7.png")
    assert ids[4, 4] == 1 and ids[8, 15] == 2  # small (id 1) over big (id 2)
    areas = {s["id"]: s["area"] for s in record["segments_info"]}
    assert areas[1] + areas[2] == 200 and areas[1] == (ids == 1).sum()


def test_finetune_segment_without_masks_is_one_line(user_data, capsys):
    assert main(finetune_argv(user_data, "--task", "segment")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("detrforge: error:")
    assert f"{user_data['train']} has no segmentation masks" in err and "--task detect" in err
    assert not (user_data["workdir"] / "datasets").exists()
