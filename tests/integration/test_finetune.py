"""`detrforge finetune` end to end on a generated COCO data set, through the CLI entry point:
doctor, cached conversion, class mapping, plan, a 4-step domain_finetune stage, per-class AP,
registration as `<name>.finetune`, and a second identical call that trains nothing."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from launch.cli import main
from launch.finetune_cli import newest_detector

PRETRAINED_CLASSES = ["circle", "triangle", "Square"]
NEW_CLASSES = ["square", "circle", "star"]  # two known (by name), one new


def write_coco(folder: Path, split: str, count: int, seed: int) -> Path:
    """count PIL-drawn images of squares, circles and stars; COCO json in folder/annotations."""
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


@pytest.fixture
def user_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "roadsigns"
    return {"train": write_coco(root, "train", 16, 0), "val": write_coco(root, "val", 8, 1),
            "images": root / "images", "export": write_pretrained(tmp_path / "pretrained"),
            "workdir": tmp_path / "runs"}


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
