"""The `small` sample sets through the real command line: sizes, speed, loaders on top."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import objects, samples, synthetic
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.shards import load_shard_info

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_make_samples_small_from_the_cli(tmp_path):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "data", "make-samples", str(tmp_path / "samples"), "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stderr
    # CPU time, not wall time: the budget is "well under a minute", and a busy machine stretches
    # wall time without the command being any slower.
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu_seconds < 40, f"make-samples small used {cpu_seconds:.0f} s of CPU"
    expected = {"classify": (3000, 400), "detect": (300, 40), "domain": (200, 40)}
    for set_name, (train, val) in expected.items():
        assert load_shard_info(tmp_path / "samples" / set_name / "train").num_samples == train
        assert load_shard_info(tmp_path / "samples" / set_name / "val").num_samples == val
    cfg = DetectionDataConfig(
        shards=str(tmp_path / "samples" / "domain"), batch_size=4, num_workers=2, train_scales=[128],
        max_size=160, eval_size=128, crop_prob=0.0, with_masks=True,
    )  # fmt: skip
    loader = build_detection_loader(cfg, "train")
    objects = [len(t["labels"]) for batch in loader for t in batch["targets"]]
    assert len(objects) == 200 and sum(objects) / len(objects) > 5  # aerial: many small objects
    assert loader.skipped == {}


# The detection and domain images and masks of seed 0, as first generated. Changing the
# classification set (or anything the renderers share with it) must leave them as they are:
# a detection task made easier would make every number measured on it meaningless.
SCENES_SHA256 = "cf041c04ad407b408845f914b6d9e765dc22412c8b0435e65eb55bffbbbe9574"


def test_detection_and_domain_scenes_are_unchanged():
    digest = hashlib.sha256()
    for index in range(4):
        image, instances, _ = synthetic.render_detect_scene(
            samples._rng(0, "detect", "train", index), 96, 128
        )
        aerial, aerial_instances = synthetic.render_aerial_scene(
            samples._rng(0, "domain", "train", index), 96
        )
        for picture, found in ((image, instances), (aerial, aerial_instances)):
            digest.update(picture.tobytes())
            for category_id, mask in found:
                digest.update(bytes([category_id]) + np.packbits(mask).tobytes())
    assert digest.hexdigest() == SCENES_SHA256


def test_object_images_are_deterministic_and_of_every_kind():
    first = [
        objects.render_object_image(samples._rng(3, "classify", "val", i), i % 20, 112)
        for i in range(20)
    ]
    again = objects.render_object_image(samples._rng(3, "classify", "val", 7), 7, 112)
    assert len(objects.CLASSIFY_CLASSES) == len(set(objects.CLASSIFY_CLASSES)) == 20
    assert all(image.shape == (112, 112, 3) and image.dtype == np.uint8 for image in first)
    assert np.array_equal(first[7], again)
    assert not np.array_equal(first[7], first[8])
    # Every kind of detection thing has at least two finer kinds in the classification set.
    shapes = [kind.shape for kind in objects.OBJECT_KINDS]
    assert all(shapes.count(shape) >= 2 for shape in set(synthetic.THING_SHAPES.values()))


def test_samples_of_an_older_version_are_not_current(tmp_path):
    samples.make_samples(tmp_path, "tiny")
    assert samples.samples_are_current(tmp_path)
    info = tmp_path / "classify" / "val" / "_info.json"
    record = json.loads(info.read_text())
    record["categories"] = record["categories"][:12]  # as the 12-class set of earlier versions
    info.write_text(json.dumps(record))
    assert not samples.samples_are_current(tmp_path)
    assert not samples.samples_are_current(tmp_path / "missing")
