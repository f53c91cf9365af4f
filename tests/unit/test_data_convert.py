"""Converters and generated samples: round trip, determinism, bad input reported and skipped."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.convert import clean_bbox, coco_to_shards, imagefolder_to_shards
from pipeline.data.errors import ConversionError, ShardInfoError
from pipeline.data.samples import make_samples
from pipeline.data.shards import load_shard_info, read_tar


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    make_samples(out, "tiny", seed=0)
    return out


def _read_set(root: Path) -> dict[str, dict[str, bytes]]:
    info = load_shard_info(root)
    return {key: members for path in info.shard_paths for key, members in read_tar(path)}


def _jpeg(path: Path, size=(40, 30), color=(200, 30, 30)) -> None:
    Image.new("RGB", size, color).save(path, format="JPEG")


def test_sample_layout_and_info(samples):
    for set_name, kind in (
        ("classify", "classification"),
        ("detect", "detection"),
        ("domain", "detection"),
    ):
        for split in ("train", "val"):
            info = load_shard_info(samples / set_name / split)
            assert info.kind == kind and info.split == split
            assert info.num_samples == sum(1 for _ in _read_set(samples / set_name / split))
    assert load_shard_info(samples / "classify" / "train").num_classes == 20
    detect = load_shard_info(samples / "detect" / "train")
    assert len(detect.shards) == 3  # 24 images, 8 per shard
    # clean data: the cleaned file that evaluation reads holds exactly the original records
    assert detect.annotation_path.name == "annotations.json"
    assert json.loads(detect.annotation_path.read_text()) == json.loads(
        (samples / "detect/annotations/instances_train.json").read_text()
    )
    panoptic = json.loads((samples / "detect/annotations/panoptic_val.json").read_text())
    assert {c["isthing"] for c in panoptic["categories"]} == {0, 1}
    assert len(list((samples / "detect/annotations/panoptic_val").glob("*.png"))) == 10


def test_panoptic_segments_match_instances(samples):
    coco = json.loads((samples / "detect/annotations/instances_val.json").read_text())
    panoptic = json.loads((samples / "detect/annotations/panoptic_val.json").read_text())
    for record in panoptic["annotations"]:
        png = np.asarray(
            Image.open(samples / "detect/annotations/panoptic_val" / record["file_name"]), np.int64
        )
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        for segment in record["segments_info"]:
            assert (ids == segment["id"]).sum() == segment["area"]
        things = sorted(s["area"] for s in record["segments_info"] if s["category_id"] < 100)
        anns = sorted(a["area"] for a in coco["annotations"] if a["image_id"] == record["image_id"])
        assert things == anns


def test_coco_round_trip_keeps_every_valid_annotation(samples, tmp_path):
    annotations = samples / "detect/annotations/instances_train.json"
    summary = coco_to_shards(
        samples / "detect/raw/train", annotations, tmp_path / "train", shard_size=5
    )
    coco = json.loads(annotations.read_text())
    assert summary.skipped == [] and summary.images_written == len(coco["images"])
    assert summary.annotations_kept == len(coco["annotations"])
    stored = {}
    for key, members in _read_set(tmp_path / "train").items():
        record = json.loads(members["json"])
        assert key == f"{record['image']['id']:012d}"
        for ann in record["annotations"]:
            stored[ann["id"]] = ann
    assert stored == {ann["id"]: ann for ann in coco["annotations"]}
    assert load_shard_info(tmp_path / "train").counts == [5, 5, 5, 5, 4]


def test_conversion_is_bit_for_bit_deterministic(samples, tmp_path):
    make_samples(tmp_path / "again", "tiny", seed=0)
    files = sorted(
        p.relative_to(samples) for p in samples.rglob("*") if p.suffix in (".tar", ".json", ".png")
    )
    assert len(files) > 20
    for rel in files:
        assert (tmp_path / "again" / rel).read_bytes() == (samples / rel).read_bytes(), rel
    annotations = samples / "detect/annotations/instances_train.json"
    coco_to_shards(samples / "detect/raw/train", annotations, tmp_path / "two", 8, 2, split="train")
    for name in ("shard-000000.tar", "shard-000002.tar", "_info.json"):
        assert (tmp_path / "two" / name).read_bytes() == (
            samples / "detect/train" / name
        ).read_bytes()


def test_tar_members_have_fixed_metadata(samples):
    with tarfile.open(samples / "classify/train/shard-000000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }
    assert [m.name.split(".")[1] for m in members[:2]] == ["cls", "jpg"]


def test_different_seed_gives_different_images(tmp_path):
    make_samples(tmp_path / "a", "tiny", seed=1)
    make_samples(tmp_path / "b", "tiny", seed=2)
    a = (tmp_path / "a/detect/train/shard-000000.tar").read_bytes()
    assert a != (tmp_path / "b/detect/train/shard-000000.tar").read_bytes()


@pytest.fixture
def bad_coco(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    _jpeg(images / "good.jpg")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    full = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(full, format="JPEG")
    (images / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    _jpeg(images / "wrong_size.jpg", size=(20, 20))

    def image(i, name):
        return {"id": i, "file_name": name, "width": 40, "height": 30}

    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [5, 5, 10, 10],
            "iscrowd": 0,
            "area": 100,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 3,
            "bbox": [5, 5, 0, 10],
            "iscrowd": 0,
        },  # degenerate
        {
            "id": 3,
            "image_id": 1,
            "category_id": 3,
            "bbox": [20, 5, -8, 10],
            "iscrowd": 0,
        },  # negative
        {
            "id": 4,
            "image_id": 1,
            "category_id": 3,
            "bbox": [50, 5, 10, 10],
            "iscrowd": 0,
        },  # out of image
        {
            "id": 5,
            "image_id": 1,
            "category_id": 3,
            "bbox": [-5, 20, 20, 20],
            "iscrowd": 0,
        },  # clipped
        {
            "id": 6,
            "image_id": 1,
            "category_id": 99,
            "bbox": [1, 1, 5, 5],
            "iscrowd": 0,
        },  # unknown id
        {"id": 7, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
    ]
    coco = {
        "images": [image(1, "good.jpg"), image(2, "corrupt.jpg"), image(3, "truncated.jpg"),
                   image(4, "missing.jpg"), image(5, "wrong_size.jpg")],
        "annotations": anns,
        "categories": [{"id": 3, "name": "thing"}],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return images, path


def test_coco_bad_input_is_reported_and_skipped(bad_coco, tmp_path):
    images, annotations = bad_coco
    summary = coco_to_shards(images, annotations, tmp_path / "out", workers=2)
    assert (
        summary.images_written == 1 and summary.annotations_kept == 2 and summary.boxes_clipped == 1
    )
    assert summary.skipped_by_reason() == {
        "corrupt_image": 2, "degenerate_box": 3, "missing_image": 1, "size_mismatch": 1, "unknown_category": 1,
    }  # fmt: skip
    by_file = {(Path(s.file).name, s.reason) for s in summary.skipped}
    assert ("corrupt.jpg", "corrupt_image") in by_file and (
        "truncated.jpg",
        "corrupt_image",
    ) in by_file
    assert ("missing.jpg", "missing_image") in by_file and (
        "instances.json",
        "unknown_category",
    ) in by_file
    (record,) = [json.loads(m["json"]) for m in _read_set(tmp_path / "out").values()]
    assert [a["bbox"] for a in record["annotations"]] == [
        [5.0, 5.0, 10.0, 10.0],
        [0.0, 20.0, 15.0, 10.0],
    ]
    assert "corrupt_image: 2" not in summary.format() and "missing.jpg" in summary.format()
    assert load_shard_info(tmp_path / "out").skipped["corrupt_image"] == 2


def test_clean_bbox_cases():
    assert clean_bbox([1, 2, 3, 4], 10, 10) == ([1.0, 2.0, 3.0, 4.0], False)
    assert clean_bbox([8, 8, 5, 5], 10, 10) == ([8.0, 8.0, 2.0, 2.0], True)
    assert clean_bbox([1, 1, float("nan"), 2], 10, 10) == (None, False)
    assert clean_bbox(None, 10, 10) == (None, False)
    assert clean_bbox([-5, -5, 4, 4], 10, 10) == (None, False)


def test_imagefolder_labels_reencoding_and_corrupt_files(tmp_path):
    src = tmp_path / "src"
    for name in ("cat", "dog"):
        (src / name).mkdir(parents=True)
        for i in range(3):
            _jpeg(
                src / name / f"{i}.jpg", color=(i * 80, 0, 0) if name == "cat" else (0, 0, i * 80)
            )
    Image.new("L", (16, 16), 128).save(src / "dog" / "gray.png")
    (src / "cat" / "broken.jpg").write_bytes(b"garbage")
    (src / "cat" / "notes.txt").write_text("ignored: not an image suffix")
    summary = imagefolder_to_shards(src, tmp_path / "out", shard_size=4)
    assert summary.images_written == 7 and summary.skipped_by_reason() == {"corrupt_image": 1}
    info = load_shard_info(tmp_path / "out")
    assert [c["name"] for c in info.categories] == ["cat", "dog"] and info.counts == [4, 3]
    labels = {}
    for members in _read_set(tmp_path / "out").values():
        image = Image.open(io.BytesIO(members["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB"
        labels[image.size] = labels.get(image.size, []) + [int(members["cls"])]
    assert sorted(labels[(40, 30)]) == [0, 0, 0, 1, 1, 1] and labels[(16, 16)] == [1]


def test_missing_inputs_raise_typed_errors(tmp_path):
    with pytest.raises(ConversionError, match="not a folder"):
        imagefolder_to_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "images").mkdir()
    with pytest.raises(ConversionError, match="not found"):
        coco_to_shards(tmp_path / "images", tmp_path / "nope.json", tmp_path / "out")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConversionError, match="not valid JSON"):
        coco_to_shards(tmp_path / "images", tmp_path / "bad.json", tmp_path / "out")
    with pytest.raises(ShardInfoError, match="make-samples"):
        load_shard_info(tmp_path)


def test_rerun_into_the_same_folder_leaves_nothing_stale(tmp_path, monkeypatch):
    from pipeline.data import samples as samples_module

    tiny = samples_module.SIZES["tiny"]
    bigger = {name: dataclasses.replace(spec, train=spec.train * 2) for name, spec in tiny.items()}
    monkeypatch.setitem(samples_module.SIZES, "bigger", bigger)
    make_samples(tmp_path, "bigger")
    summaries = make_samples(tmp_path, "tiny")
    assert summaries["classify/train"].images_written == 48
    assert len(list((tmp_path / "classify/raw/train").rglob("*.jpg"))) == 48
    assert len(list((tmp_path / "detect/annotations/panoptic_train").glob("*.png"))) == 24
    assert load_shard_info(tmp_path / "detect/train").shards == [
        f"shard-00000{i}.tar" for i in range(3)
    ]
    assert not (tmp_path / "detect/train/shard-000005.tar").exists()


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a (H, W) mask: column-major runs, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int64)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def test_rle_string_counts_matches_pycocotools():
    from pycocotools import mask as mask_utils

    from pipeline.data.coco_clean import rle_string_counts

    rng = np.random.default_rng(0)
    for shape in ((30, 40), (7, 3), (64, 64)):
        mask = rng.random(shape) < 0.3
        mask[0, 0] = True  # a run of zero zeros first: the format's edge case
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle_string_counts(rle["counts"].decode("ascii")) == _runs(mask)
    with pytest.raises(ValueError, match="ends inside"):
        rle_string_counts("0k")  # 'k' (59) has the continuation bit and nothing follows


def _polygon(x, y, side=8) -> list[list[float]]:
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


@pytest.fixture
def broken_coco(tmp_path) -> tuple[Path, Path]:
    """A COCO file with every item of the bad-COCO list, beside three good 40x30 images."""
    from pycocotools import mask as mask_utils

    images = tmp_path / "images"
    images.mkdir()
    for name in ("one.jpg", "two.jpg", "other.jpg", "three.jpg"):
        _jpeg(images / name)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:15, 5:20] = 1
    good_rle = mask_utils.encode(np.asfortranarray(mask))
    wide = mask_utils.encode(np.asfortranarray(np.zeros((30, 41), np.uint8)))

    def image(i, name):
        return {"id": i, "file_name": name, "width": 40, "height": 30}

    def ann(i, image_id=1, **kw):
        return {"id": i, "image_id": image_id, "category_id": 1, "bbox": [5, 5, 10, 10],
                "iscrowd": 0, "area": 100, "segmentation": _polygon(5, 5), **kw}

    anns = [
        ann(1),
        ann(1, bbox=[1, 1, 4, 4]),  # duplicate annotation id
        ann(3, image_id=99),  # dangling image id
        "not an annotation",  # not a dict
        ann(4, iscrowd="yes"),  # wrong type
        ann(5, bbox=[1, 2, 3]),  # bbox not 4 numbers
        ann(6, bbox=["1", 2, 3, 4]),  # bbox with a string
        ann(7, segmentation=[[1, 1, 9, 1, 9]]),  # odd polygon
        ann(8, segmentation=[[1, 1, 9, 9]]),  # 2-point polygon
        ann(9, segmentation={"size": [30, 40], "counts": [0, 1000, 500]}),  # sums past h*w
        ann(10, segmentation={"size": [60, 40], "counts": [2400]}),  # size is not the image's
        ann(11, image_id=3, segmentation={"size": [30, 40], "counts": good_rle["counts"].decode()}),
        ann(12, image_id=3, segmentation={"size": [30, 40], "counts": wide["counts"].decode()}),
        ann(13, image_id=2),  # its image id names two different records
        ann(14, image_id=3, iscrowd=1, area=None, bbox=[0, 0, 20, 20], segmentation={"size": [30, 40], "counts": [1200]}),
    ]  # fmt: skip
    coco = {
        "info": {"description": "broken on purpose"},
        "images": [image(1, "one.jpg"), image(2, "two.jpg"), image(2, "other.jpg"),
                   image(3, "three.jpg"), image(3, "three.jpg")],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}, {"id": 1, "name": "again"}, "x"],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return images, path


def test_every_bad_coco_item_is_reported_skipped_and_kept_out_of_evaluation(broken_coco, tmp_path):
    from pipeline.data.decoding import decode_segmentation
    from pipeline.eval.coco import load_coco

    images, annotations = broken_coco
    summary = coco_to_shards(images, annotations, tmp_path / "out")
    assert summary.skipped_by_reason() == {
        "dangling_image_id": 1, "duplicate_annotation_id": 1, "duplicate_category_id": 1,
        "duplicate_image_id": 4, "invalid_annotation": 2, "invalid_bbox": 2,
        "invalid_category": 1, "invalid_segmentation": 5,
    }  # fmt: skip
    assert {s.file for s in summary.skipped} == {str(annotations)}
    details = "\n".join(s.detail for s in summary.skipped)
    for words in ("iscrowd 'yes'", "odd number", "2 points", "sum to 1500", "[60, 40]",
                  "sum to 1230", "different records", "id 1 listed again"):  # fmt: skip
        assert words in details, words
    assert (summary.images_written, summary.annotations_kept) == (2, 3)
    records = {key: json.loads(m["json"]) for key, m in _read_set(tmp_path / "out").items()}
    assert sorted(records) == [f"{1:012d}", f"{3:012d}"]  # one key per id, no collision
    info = load_shard_info(tmp_path / "out")
    assert info.skipped["invalid_segmentation"] == 5 and [c["name"] for c in info.categories] == [
        "thing"
    ]
    cleaned = json.loads(info.annotation_path.read_text())
    assert [im["id"] for im in cleaned["images"]] == [1, 3]
    assert [a["id"] for a in cleaned["annotations"]] == [1, 11, 14]
    assert cleaned["info"] == {"description": "broken on purpose"}
    assert cleaned["annotations"][2]["area"] == 400.0  # missing area filled from the box
    gt = load_coco(info.annotation_path)  # what evaluation reads: pycocotools indexes it
    assert sorted(gt.anns) == [1, 11, 14]
    for record in cleaned["annotations"]:
        assert decode_segmentation(record["segmentation"], 30, 40).shape == (30, 40)


def test_cleaned_file_lists_only_the_images_written(bad_coco, tmp_path):
    images, annotations = bad_coco
    coco_to_shards(images, annotations, tmp_path / "out")
    cleaned = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [im["file_name"] for im in cleaned["images"]] == ["good.jpg"]
    assert [a["id"] for a in cleaned["annotations"]] == [1, 5]  # 7 belonged to a corrupt image
    with pytest.raises(ConversionError, match="overwritten"):
        coco_to_shards(images, tmp_path / "out" / "annotations.json", tmp_path / "out")
