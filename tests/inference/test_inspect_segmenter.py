"""`detrforge inspect` on a segmenter export with --annotations: ground-truth rows named by the
segmenter's classes and every shown query's mask in inspect.json."""

from __future__ import annotations

import json

from launch.cli import main


def test_inspect_of_a_segmenter_export_writes_masks_and_ground_truth(make_export, samples, tmp_path,
                                                                       capsys):
    export = make_export(tmp_path / "segmenter", segmenter=True)
    raw = samples / "detect" / "raw" / "val"
    images = sorted(raw.glob("*.jpg"))[:2]
    out = tmp_path / "inspect"
    assert main(["inspect", str(export), *map(str, images), "--annotations",
                 str(samples / "detect" / "annotations" / "instances_val.json"),
                 "--out", str(out), "--top-k", "3"]) == 0
    summary = json.loads((out / "inspect.json").read_text())
    assert summary["model"]["kind"] == "segmenter" and len(summary["images"]) == 2
    classes = set(summary["model"]["classes"])
    rows = [row for image in summary["images"] for row in image["ground_truth"]]
    assert rows and {row["name"] for row in rows} <= classes and all(row["verdict"] for row in rows)
    queries = [query for image in summary["images"] for query in image["queries"]]
    assert queries and all(isinstance(query["mask_area"], int) for query in queries)
    assert (out / "report.html").is_file() and "ground-truth objects:" in capsys.readouterr().out
