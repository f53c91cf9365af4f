"""`detrforge data check | yolo-to-coco | voc-to-coco` through the real entry point: exit codes,
reports, one-line errors without a traceback."""

from __future__ import annotations

import json

from PIL import Image

from launch.cli import main
from tests.unit.test_data_formats import make_voc, make_yolo


def _coco(tmp_path, missing: bool = False):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.jpg")
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}]
    if missing:
        images.append({"id": 2, "file_name": "gone.jpg", "width": 40, "height": 30})
    coco = {"images": images, "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco))
    return path


def test_check_exit_codes_and_report(tmp_path, capsys):
    path = _coco(tmp_path, missing=True)
    argv = ["data", "check", str(path), "--images", str(tmp_path / "images")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "missing_image (1)" in out and "gone.jpg" in out and "ok: 0 errors, 1 warnings" in out
    report = tmp_path / "reports" / "check.json"
    assert main([*argv, "--strict", "--report", str(report)]) == 2
    assert "FAILED" in capsys.readouterr().out
    assert json.loads(report.read_text())["findings"][0]["code"] == "missing_image"


def test_check_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.json"), "--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detrforge: error:") and "nope.json not found" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    path = _coco(tmp_path)
    assert main(["data", "check", str(path), "--images", str(tmp_path / "none")]) == 2
    assert "images folder" in capsys.readouterr().err


def test_yolo_to_coco_writes_json_and_checks_it(tmp_path, capsys):
    make_yolo(tmp_path / "yolo")
    out = tmp_path / "coco" / "train.json"
    assert main(["data", "yolo-to-coco", str(tmp_path / "yolo"), "--split", "train",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "wrote" in printed and "invalid_label_line" in printed and "coco-to-shards" in printed
    assert len(json.loads(out.read_text())["images"]) == 3
    assert main(["data", "yolo-to-coco", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "expected YOLO_DIR/images" in err and "Traceback" not in err


def test_voc_to_coco_writes_json_and_checks_it(tmp_path, capsys):
    make_voc(tmp_path / "voc")
    out = tmp_path / "voc.json"
    assert main(["data", "voc-to-coco", str(tmp_path / "voc"), "--out", str(out)]) == 0
    assert "invalid_xml" in capsys.readouterr().out
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == ["cat", "dog", "person"]
    assert main(["data", "voc-to-coco", str(tmp_path), "--out", str(out)]) == 2
    assert "Annotations" in capsys.readouterr().err
