"""The schedule rule of `detrforge finetune` on small and large data sets, and the input hash."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.finetune_data import CocoSplit, dataset_hash
from pipeline.finetune_plan import (
    Budget,
    DatasetStats,
    PlanError,
    PretrainedRecipe,
    StepTime,
    measured_step_time,
    plan_schedule,
)

COCO_R50 = PretrainedRecipe(batch_size=4, eval_size=800, lr=1e-4)


def stats(images: int, short: float = 600, rel: float = 0.2, aspect: float = 1.33) -> DatasetStats:
    return DatasetStats(images, images * 5, short, aspect, rel)


def test_small_data_set_gets_many_epochs_large_one_twelve():
    small = plan_schedule(stats(400), Budget(), COCO_R50)
    large = plan_schedule(stats(118_000), Budget(), COCO_R50)
    assert small.epochs == pytest.approx(100, rel=0.02)  # 400 images: 100 epochs = 10000 steps
    assert small.max_steps == 10_000
    assert large.epochs == pytest.approx(12, rel=0.01)
    assert large.max_steps == 354_000
    assert small.warmup_steps == 500 and large.warmup_steps == 1000  # 5%, capped at 1000
    assert small.milestones == [8000] and large.milestones == [283_200]  # lr drop at 80%


def test_tiny_data_set_has_a_floor_of_steps_and_a_batch_no_larger_than_it():
    plan = plan_schedule(stats(3), Budget(), COCO_R50)
    assert plan.batch_size == 3 and plan.max_steps == 200


def test_steps_budget_is_taken_as_given():
    plan = plan_schedule(stats(400), Budget(steps=4), COCO_R50)
    assert plan.max_steps == 4 and plan.warmup_steps == 0 and plan.milestones == [3]


def test_minutes_budget_divides_by_the_step_time_scaled_to_the_batch_pixels():
    plan = plan_schedule(stats(400, short=2000), Budget(minutes=10), COCO_R50,
                         StepTime(seconds=0.5, pixels=1e6, source="test"))
    pixels = 4 * (sum(plan.train_scales) / len(plan.train_scales)) ** 2 * 1.33
    assert plan.max_steps == int(600 / (0.5 * pixels / 1e6))
    assert plan.max_steps > 100
    with pytest.raises(PlanError, match="step time"):
        plan_schedule(stats(400), Budget(minutes=10), COCO_R50)


def test_small_images_are_not_upsampled_and_scales_span_60_to_100_percent():
    plan = plan_schedule(stats(400, short=480), Budget(steps=10), COCO_R50)
    assert plan.eval_size == 480 and plan.train_scales == list(range(288, 481, 32))
    assert plan.max_size == 800


def test_tiny_objects_enlarge_the_input_size_within_twice_the_pretrained():
    big_objects = plan_schedule(stats(400, short=1000, rel=0.1), Budget(steps=10), COCO_R50)
    tiny_objects = plan_schedule(stats(400, short=1000, rel=0.015), Budget(steps=10), COCO_R50)
    assert big_objects.eval_size == 800
    assert tiny_objects.eval_size == 1056  # 16 px / 0.015 = 1067 px, rounded to 32
    assert plan_schedule(stats(400, short=4000, rel=0.001), Budget(steps=10),
                         COCO_R50).eval_size == 1600


def test_budget_and_stats_are_validated():
    with pytest.raises(PlanError, match="not both"):
        Budget(steps=3, minutes=1)
    with pytest.raises(PlanError, match=">= 1"):
        Budget(steps=0)
    with pytest.raises(PlanError, match="no usable image"):
        stats(0)


def test_measured_step_time_is_the_median_of_the_logged_steps(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": i, "metrics": {"train/step_time_s": t}} for i, t in enumerate([1, 3, 2])]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut")
    measured = measured_step_time(log, 4, 100)
    assert measured.seconds == 2 and "measured" in measured.source
    assert measured_step_time(tmp_path / "none.jsonl", 4, 100) is None


def test_the_input_hash_follows_the_json_and_the_listed_images(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"x")
    (images / "unlisted.jpg").write_bytes(b"y")
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    split = CocoSplit(ann, images)
    first = dataset_hash(split, split)
    assert dataset_hash(split, split) == first
    (images / "unlisted.jpg").write_bytes(b"yy")
    assert dataset_hash(split, split) == first  # not listed: not read by the conversion
    os.utime(images / "a.jpg", ns=(1, 1))
    touched = dataset_hash(split, split)
    assert touched != first
    ann.write_text(json.dumps({"images": [{"id": 2, "file_name": "a.jpg"}]}))
    assert dataset_hash(split, split) not in (first, touched)
