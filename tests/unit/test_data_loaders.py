"""Loaders: fixed steps per epoch, exact resume, disjoint ranks, exact-once eval, bad samples."""

from __future__ import annotations

import io
import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.data.classification import ClassificationDataConfig, build_classification_loader
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.errors import DataError
from pipeline.data.samples import make_samples
from pipeline.data.shards import ShardInfo, read_tar, shard_name, write_shard_info, write_tar
from pipeline.data.stream import partition_shards
from tests.unit.loader_take import take_batches


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    make_samples(out, "tiny", seed=0)
    return out


def _detect_cfg(root: Path, **overrides) -> DetectionDataConfig:
    settings = dict(
        shards=str(root), batch_size=2, num_workers=0, train_scales=[48, 64], max_size=96, eval_size=64,
        crop_resize_scales=[64], crop_min_size=32, crop_max_size=64, shuffle_buffer=8, with_masks=True,
    )  # fmt: skip
    settings.update(overrides)
    return DetectionDataConfig(**settings)


def _fingerprint(batch: dict) -> list:
    """Everything a batch holds, as comparable values."""
    targets = [
        (t["image_id"], t["labels"].tolist(), t["boxes"].tolist(), t["masks"].sum().item())
        for t in batch["targets"]
    ]
    return [batch["images"].sum().item(), batch["images"].shape, targets]


def _take(loader, count: int) -> list:
    return take_batches(loader, count, _fingerprint)


def test_fixed_steps_per_epoch(samples):
    loader = build_detection_loader(_detect_cfg(samples / "detect", steps_per_epoch=5), "train")
    assert loader.steps_per_epoch == len(loader) == 5 and loader.num_classes == 7
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == 5 and all(len(b["targets"]) == 2 for b in batches)
        assert loader.state_dict()["epoch"] == epoch + 1
    default = build_detection_loader(_detect_cfg(samples / "detect"), "train", rank=1, world_size=2)
    assert default.steps_per_epoch == 24 // (2 * 2)


def test_batches_follow_the_convention(samples):
    batch = next(iter(build_detection_loader(_detect_cfg(samples / "detect"), "train")))
    images, padding = batch["images"], batch["padding_mask"]
    assert (
        images.dtype == torch.uint8 and images.shape[:2] == (2, 3) and padding.dtype == torch.bool
    )
    assert images[padding[:, None].expand_as(images)].eq(0).all()  # padding is 0
    for i, target in enumerate(batch["targets"]):
        h, w = target["size"].tolist()
        assert not padding[i, :h, :w].any() and padding[i].sum() == padding[i].numel() - h * w
        assert target["boxes"].min() >= 0 and target["boxes"].max() <= 1
        assert (
            target["masks"].shape == (len(target["labels"]), h, w)
            and target["labels"].dtype == torch.int64
        )
        assert min(target["orig_size"].tolist()) == 96  # tiny detect images: 96 px shorter side


@pytest.mark.parametrize("num_workers, consumed", [(0, 3), (0, 4), (2, 3)])
def test_resume_gives_the_batches_of_the_uninterrupted_run(samples, num_workers, consumed):
    """Stop after ``consumed`` batches (mid-epoch, or exactly at the epoch end), resume."""
    cfg = _detect_cfg(samples / "detect", steps_per_epoch=4, num_workers=num_workers)
    expected = _take(build_detection_loader(cfg, "train", seed=3), 7)  # crosses an epoch end
    first = build_detection_loader(cfg, "train", seed=3)
    head = _take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))  # the state survives a JSON round trip
    resumed = build_detection_loader(cfg, "train", seed=3)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 7 - consumed) == expected
    other_seed = _take(build_detection_loader(cfg, "train", seed=4), 3)
    assert other_seed != expected[:3]


def test_workers_outlive_an_epoch_read_to_its_end(samples):
    """A new fork per epoch made the trainer copy every page it wrote afterwards (1-2 s)."""
    cfg = _detect_cfg(samples / "detect", steps_per_epoch=3, num_workers=2)
    loader = build_detection_loader(cfg, "train", seed=5)
    workers = []
    for _ in range(3):
        for index, _batch in enumerate(loader):
            if index == 1:
                workers.append(sorted(p.pid for p in multiprocessing.active_children()))
    assert len(workers[0]) == 2 and workers[0] == workers[1] == workers[2]
    fresh = build_detection_loader(cfg, "train", seed=5)  # the same batches as new workers give
    assert _take(fresh, 9)[6:] == [_fingerprint(b) for b in _epoch_of(cfg, epoch=2)]


def _epoch_of(cfg, epoch: int) -> list:
    loader = build_detection_loader(cfg, "train", seed=5)
    loader.load_state_dict({**loader.state_dict(), "epoch": epoch})
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_consumer_that_stops_mid_epoch_continues_where_it_stopped(samples, num_workers):
    cfg = _detect_cfg(samples / "detect", steps_per_epoch=4, num_workers=num_workers)
    expected = _take(build_detection_loader(cfg, "train", seed=3), 9)
    loader = build_detection_loader(cfg, "train", seed=3)
    pieces = _take(loader, 3) + _take(loader, 2) + _take(loader, 4)  # breaks inside epochs 1 and 2
    assert pieces == expected


def test_worker_count_does_not_change_a_stream_with_one_worker(samples):
    cfg = _detect_cfg(samples / "detect", steps_per_epoch=3)
    in_process = _take(build_detection_loader(cfg, "train"), 3)
    assert (
        _take(
            build_detection_loader(
                _detect_cfg(samples / "detect", steps_per_epoch=3, num_workers=1), "train"
            ),
            3,
        )
        == in_process
    )


def test_resume_refuses_a_different_setup(samples):
    loader = build_detection_loader(_detect_cfg(samples / "detect"), "train")
    state = loader.state_dict()
    other = build_detection_loader(_detect_cfg(samples / "detect", batch_size=3), "train")
    with pytest.raises(DataError, match="batch_size"):
        other.load_state_dict(state)


def test_two_ranks_see_disjoint_data(samples):
    cfg = _detect_cfg(samples / "detect", steps_per_epoch=6, num_workers=0)
    seen = []
    for rank in range(2):
        loader = build_detection_loader(cfg, "train", rank=rank, world_size=2)
        seen.append({t["image_id"] for batch in loader for t in batch["targets"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert partition_shards(["a", "b", "c", "d", "e"], 1, 2, 1, 2) == ["d"]
    assert partition_shards(["a"], 1, 2, 0, 2) == ["a"]  # too few shards: every rank reads all


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_loader_covers_every_image_exactly_once(samples, num_workers):
    cfg = _detect_cfg(samples / "detect", num_workers=num_workers, batch_size=3)
    coco = json.loads((samples / "detect/annotations/instances_val.json").read_text())
    per_rank = []
    for rank in range(2):
        loader = build_detection_loader(cfg, "val", rank=rank, world_size=2)
        ids = [t["image_id"] for batch in loader for t in batch["targets"]]
        assert len(ids) == len(set(ids)) == loader.num_samples and len(loader) >= -(-len(ids) // 3)
        assert ids == [t["image_id"] for batch in loader for t in batch["targets"]]  # deterministic
        per_rank.append(set(ids))
    assert per_rank[0] | per_rank[1] == {image["id"] for image in coco["images"]}
    assert not per_rank[0] & per_rank[1]


def test_category_map_round_trip(samples):
    loader = build_detection_loader(_detect_cfg(samples / "detect"), "val")
    mapping = loader.category_map
    ids = [c["id"] for c in loader.categories]
    assert ids == [1, 2, 4, 5, 7, 9, 11]
    assert [mapping.to_label(i) for i in ids] == list(range(7))
    assert mapping.to_category_ids(torch.tensor([[0, 6], [2, 3]])).tolist() == [[1, 11], [4, 5]]
    assert 3 not in mapping and mapping.names[-1] == "pole"


def test_classification_loader(samples):
    cfg = ClassificationDataConfig(
        shards=str(samples / "classify"),
        batch_size=8,
        num_workers=0,
        image_size=32,
        shuffle_buffer=16,
    )
    loader = build_classification_loader(cfg, "train")
    batches = list(loader)
    assert len(batches) == 48 // 8 and loader.num_classes == 20
    assert all(b["images"].shape == (8, 3, 32, 32) and b["labels"].max() < 20 for b in batches)
    labels = [
        label for b in build_classification_loader(cfg, "val") for label in b["labels"].tolist()
    ]
    assert len(labels) == len(set(labels)) == 12  # the 12 val images are of 12 classes


def test_config_validation(samples):
    with pytest.raises(ValueError, match="batch_size"):
        _detect_cfg(samples, batch_size=0)
    with pytest.raises(ValueError, match="crop_min_size"):
        _detect_cfg(samples, crop_min_size=100, crop_max_size=50)
    with pytest.raises(ValueError, match="crop_scale"):
        ClassificationDataConfig(shards="x", crop_scale=[0.5])
    with pytest.raises(DataError, match="classification shards"):
        build_detection_loader(_detect_cfg(samples / "classify"), "train")


def _broken_set(samples: Path, root: Path) -> Path:
    """A detection set with one good shard and one of each bad sample, plus a truncated shard."""
    good = list(read_tar(samples / "detect/train/shard-000000.tar"))
    record = json.loads(good[0][1]["json"])
    unknown = dict(record, annotations=[dict(a, category_id=999) for a in record["annotations"]])
    jpeg = io.BytesIO()
    Image.new("RGB", (10, 10)).save(jpeg, format="JPEG")
    bad = [
        ("corrupt", {"jpg": b"\xff\xd8 broken", "json": good[1][1]["json"]}),
        ("badjson", {"jpg": good[2][1]["jpg"], "json": b"{not json"}),
        ("nojson", {"jpg": good[3][1]["jpg"]}),
        ("wrongsize", {"jpg": jpeg.getvalue(), "json": good[4][1]["json"]}),
        ("unknown", {"jpg": good[0][1]["jpg"], "json": json.dumps(unknown).encode()}),
    ]
    split = root / "train"
    split.mkdir(parents=True)
    write_tar(split / shard_name(0), good)
    write_tar(split / shard_name(1), bad)
    write_tar(split / shard_name(2), good)
    data = (split / shard_name(2)).read_bytes()
    (split / shard_name(2)).write_bytes(data[: len(data) // 2])
    categories = json.loads((samples / "detect/train/_info.json").read_text())["categories"]
    write_shard_info(
        ShardInfo(
            split, "detection", "train", [shard_name(i) for i in range(3)], [8, 5, 8], categories
        )
    )
    return root


def test_bad_samples_are_skipped_and_counted(samples, tmp_path):
    root = _broken_set(samples, tmp_path / "broken")
    cfg = _detect_cfg(root, steps_per_epoch=30, num_workers=0)
    loader = build_detection_loader(cfg, "train")
    assert len(list(loader)) == 30
    skipped = dict(loader.skipped)
    for reason in (
        "corrupt_image",
        "corrupt_json",
        "incomplete_sample",
        "size_mismatch",
        "unknown_category",
        "corrupt_tar",
    ):
        assert skipped.get(reason, 0) > 0, (reason, skipped)
    assert loader.state_dict()["skipped"] == skipped


def test_all_bad_shards_raise_instead_of_hanging(tmp_path):
    split = tmp_path / "bad" / "train"
    split.mkdir(parents=True)
    write_tar(split / shard_name(0), [("a", {"jpg": b"nope", "json": b"{}"})])
    write_shard_info(
        ShardInfo(split, "detection", "train", [shard_name(0)], [1], [{"id": 1, "name": "x"}])
    )
    loader = build_detection_loader(_detect_cfg(tmp_path / "bad"), "train")
    with pytest.raises(DataError, match="without one usable sample"):
        next(iter(loader))


def test_eval_loader_skips_bad_samples_too(samples, tmp_path):
    root = _broken_set(samples, tmp_path / "broken")
    loader = build_detection_loader(_detect_cfg(root, train_splits=[]), "train")
    ids = [t["image_id"] for batch in loader for t in batch["targets"]]
    assert (
        len(ids) >= 8 + 1
    )  # the good shard, the sample with unknown categories, part of the cut one
    for reason in (
        "corrupt_image",
        "corrupt_json",
        "incomplete_sample",
        "size_mismatch",
        "corrupt_tar",
    ):
        assert loader.skipped.get(reason, 0) > 0, (reason, loader.skipped)


def test_shuffle_buffer_larger_than_many_shards_is_not_mistaken_for_bad_data(samples):
    """Filling a 200-sample buffer from 8-sample shards opens 25 shards before any batch."""
    loader = build_detection_loader(_detect_cfg(samples / "detect", shuffle_buffer=200), "train")
    batch = next(iter(loader))
    assert batch["images"].shape[0] == 2
