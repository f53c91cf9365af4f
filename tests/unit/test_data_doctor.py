"""The data-set doctor: every listed defect found and counted; strict mode; report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.doctor import DoctorConfig, DoctorReport, Finding, check_coco
from pipeline.data.errors import DataError

CFG = DoctorConfig(input_size=64, max_size=128, imbalance_ratio=3.0)


def _box(i, image_id, category_id=1, bbox=(5, 5, 10, 10)):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "iscrowd": 0, "area": bbox[2] * bbox[3]}  # fmt: skip


@pytest.fixture
def sick(tmp_path) -> tuple[Path, Path]:
    """A data set with one of each defect the doctor looks for (40x30 images)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "extra.jpg"):
        Image.new("RGB", (40, 30)).save(images / name)
    Image.new("RGB", (20, 20)).save(images / "small.jpg")

    def image(i, name):
        return {"id": i, "file_name": name, "width": 40, "height": 30}

    anns = [_box(i, 1) for i in range(1, 8)] + [
        _box(8, 2, category_id=3),
        _box(8, 2),  # duplicate annotation id
        _box(9, 2, category_id=5),  # category missing
        _box(10, 3, bbox=(5, 5, 0, 4)),  # degenerate
        _box(11, 3, bbox=(35, 5, 10, 10)),  # partly outside: clipped
        _box(12, 3, bbox=(1, 1, 1, 1)),  # ~2 px after resizing to 64
    ]
    coco = {
        "images": [image(1, "a.jpg"), image(2, "b.jpg"), image(3, "c.jpg"), image(3, "c.jpg"),
                   image(4, "gone.jpg"), image(5, "small.jpg")],
        "annotations": anns,
        "categories": [{"id": 1, "name": "car"}, {"id": 3, "name": "bus"}, {"id": 7, "name": "cat"}],
    }  # fmt: skip
    train = tmp_path / "train.json"
    train.write_text(json.dumps(coco))
    val = {**coco, "categories": [{"id": 1, "name": "car"}, {"id": 3, "name": "truck"}]}
    (tmp_path / "val.json").write_text(json.dumps(val))
    return images, train


def test_every_defect_is_found_and_counted(sick):
    images, train = sick
    report = check_coco(train, images, CFG, val_annotations=train.parent / "val.json")
    counts = {f.code: (f.severity, f.count) for f in report.findings}
    assert counts == {
        "category_ids_not_contiguous": ("info", 3),
        "unused_category": ("warning", 1),
        "unknown_category": ("warning", 1),
        "duplicate_image_id": ("warning", 1),
        "duplicate_annotation_id": ("warning", 1),
        "missing_image": ("warning", 1),
        "unlisted_image": ("info", 1),
        "size_mismatch": ("warning", 1),
        "degenerate_box": ("warning", 1),
        "clipped_box": ("warning", 1),
        "tiny_objects": ("warning", 1),
        "images_without_annotations": ("info", 2),
        "class_imbalance": ("warning", 2),
        "val_categories_differ": ("error", 2),
    }
    assert report.finding("missing_image").examples == ("gone.jpg",)
    assert report.finding("unlisted_image").examples == ("extra.jpg",)
    assert report.finding("size_mismatch").examples == ("small.jpg is 20x20, json 40x30",)
    assert report.finding("class_imbalance").examples == ("most: car 9", "least: bus 1")
    assert "skips" in report.finding("missing_image").action
    assert report.stats == {"images": 6, "images_kept": 3, "annotations": 13,
                            "annotations_kept": 10, "categories": 3}  # fmt: skip


def test_strict_turns_warnings_into_errors(sick, tmp_path):
    images, train = sick
    report = check_coco(train, images, CFG)
    assert report.errors() == [] and "ok: 0 errors" in report.format()
    assert {f.code for f in report.errors(strict=True)} >= {"missing_image", "tiny_objects"}
    assert "FAILED" in report.format(strict=True)
    markdown = report.write(tmp_path / "out" / "report.md", strict=True).read_text()
    assert markdown.startswith("# data check") and "- **warning** missing_image (1)" in markdown
    record = json.loads(report.write(tmp_path / "report.json").read_text())
    assert DoctorReport(**{**record, "findings": [
        Finding(**{**f, "examples": tuple(f["examples"])}) for f in record["findings"]
    ]}) == report  # fmt: skip


def test_a_clean_set_has_no_warnings_and_input_size_decides_tiny(tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 400, "height": 300}],
            "annotations": [_box(1, 1, bbox=(10, 10, 2, 2))],
            "categories": [{"id": 1, "name": "dot"}]}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(coco))
    big = check_coco(tmp_path / "a.json", tmp_path, DoctorConfig(input_size=800))
    assert big.errors(strict=True) == []  # 2 px * 800/300 = 5.3 px
    small = check_coco(tmp_path / "a.json", tmp_path, DoctorConfig(input_size=320, max_size=640))
    assert small.finding("tiny_objects").count == 1  # 2 px * 320/300 = 2.1 px


def test_no_usable_image_is_an_error_and_bad_inputs_raise(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "x.jpg", "width": 4, "height": 4}],
            "annotations": [], "categories": []}  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps(coco))
    report = check_coco(tmp_path / "a.json", tmp_path)
    assert {f.code for f in report.errors()} == {"no_usable_image", "no_categories"}
    with pytest.raises(DataError, match="images folder"):
        check_coco(tmp_path / "a.json", tmp_path / "nope")
    with pytest.raises(DataError, match="not found"):
        check_coco(tmp_path / "missing.json", tmp_path)
    with pytest.raises(DataError, match="input_size"):
        DoctorConfig(input_size=0)
