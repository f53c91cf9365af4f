"""The fine-tuning schedule: steps, warmup, lr drop and image scales from the data set and a budget.

The rule (``plan_schedule``), in order:

1. **Batch**: the pretrained recipe's batch size, at most the number of training images.
2. **Image scales**: the evaluation size (shorter side) is the pretrained recipe's, but not larger
   than the data set's median shorter image side (no upsampling of small images) and, when the
   median object would be under ``MIN_OBJECT_PX`` (16 px) on its shorter side at that size,
   raised until it is not, up to twice the pretrained size and twice the median image side.
   It is rounded to 32 px (16 px below 64). Training draws shorter sides from 0.6x to 1.0x of it
   in steps of 32 px (DETR's 480..800 for 800); the longer side is capped at 1333/800 of it.
3. **Steps**: ``--steps N`` as given. ``--minutes M``: M*60 seconds divided by the step time,
   measured (the pretrained run's logged ``train/step_time_s``, scaled by the batch's pixels)
   or else estimated (``ESTIMATED_S_PER_MEGAPIXEL`` for the device). Neither: a number of epochs
   that grows as the data set shrinks, ``12 * sqrt(50000 / images)`` clamped to 12..100 epochs
   (COCO-sized sets get DETR's 12-epoch fine-tune, a few hundred images 100 epochs), at least
   ``MIN_DEFAULT_STEPS``.
4. **Warmup**: 5% of the steps, at most 1000.
5. **lr drop**: one drop by 10x at 80% of the steps (DETR drops at 40 of 50 epochs, DINO at 11 of
   12); the learning rate is the pretrained recipe's.

Every number is a pure function of the statistics and the budget, so a second identical call
plans the same schedule (and the stage cache can say "up to date").
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.data.coco_clean import CleanCoco

MIN_OBJECT_PX = 16.0  # median object's shorter side wanted at the evaluation size (pixels)
MAX_TO_EVAL_RATIO = 1333 / 800  # longer-side cap over shorter side, DETR's
TRAIN_SCALE_LOW = 0.6  # smallest training scale as a fraction of the evaluation size
MIN_DEFAULT_STEPS = 200
WARMUP_FRACTION, MAX_WARMUP = 0.05, 1000
LR_DROP_AT, LR_DROP_GAMMA = 0.8, 0.1
# Rough seconds per training megapixel (batch images x pixels) of a Deformable-DETR R50 step;
# the tiny sample recipes are about 10x faster. Used only when no step time was measured.
ESTIMATED_S_PER_MEGAPIXEL = {"cpu": 8.0, "cuda": 0.12}


class PlanError(ValueError):
    """A budget or data set that no schedule can be planned for."""


@dataclass(frozen=True)
class DatasetStats:
    """What the schedule rule reads from a (cleaned) training set."""

    images: int  # usable training images
    annotations: int  # usable, non-crowd annotations
    median_short_side: float  # median shorter image side (pixels)
    median_aspect: float  # median longer/shorter side ratio
    median_object_rel: float  # median object's shorter box side / its image's shorter side

    def __post_init__(self) -> None:
        if self.images < 1:
            raise PlanError("the training set has no usable image; see the data check above")


def dataset_stats(clean: CleanCoco) -> DatasetStats:
    """Statistics of a cleaned COCO set (``pipeline.data.coco_clean.clean_coco``)."""
    shorts, aspects, rel = [], [], []
    for image in clean.images:
        short = min(image["width"], image["height"])
        shorts.append(short)
        aspects.append(max(image["width"], image["height"]) / short)
        for ann in clean.annotations.get(image["id"], []):
            if not ann.get("iscrowd"):
                rel.append(min(ann["bbox"][2], ann["bbox"][3]) / short)
    if not shorts:
        raise PlanError("the training set has no usable image; see the data check above")
    return DatasetStats(len(shorts), len(rel), statistics.median(shorts),
                        statistics.median(aspects), statistics.median(rel) if rel else 1.0)


@dataclass(frozen=True)
class Budget:
    """How long to train: exactly one of steps or minutes, or neither (the epoch rule)."""

    steps: int | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.minutes is not None:
            raise PlanError("give --steps or --minutes, not both")
        if self.steps is not None and self.steps < 1:
            raise PlanError(f"--steps must be >= 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise PlanError(f"--minutes must be > 0, got {self.minutes}")


@dataclass(frozen=True)
class PretrainedRecipe:
    """The values of the pretrained model's recipe the rule starts from (its meta.json)."""

    batch_size: int = 4
    eval_size: int = 800
    lr: float = 1e-4

    @classmethod
    def from_meta(cls, meta: dict) -> PretrainedRecipe:
        config = meta.get("config") or {}
        data, optim = config.get("data") or {}, config.get("optim") or {}
        return cls(int(data.get("batch_size", 4)), int(data.get("eval_size", 800)),
                   float(optim.get("lr", 1e-4)))


@dataclass(frozen=True)
class StepTime:
    """Seconds per training step of a reference batch, and where the number comes from."""

    seconds: float
    pixels: float  # batch images x pixels of the step it was measured or estimated for
    source: str  # "measured (<file>)" or "estimated (<device>)"

    def for_pixels(self, pixels: float) -> float:
        """The step time scaled to a batch of ``pixels`` (time ~ pixels)."""
        return self.seconds * pixels / self.pixels


@dataclass(frozen=True)
class Schedule:
    """The planned values, written into the generated recipe."""

    batch_size: int
    max_steps: int
    warmup_steps: int
    milestones: list[int]
    lr: float
    eval_size: int
    max_size: int
    train_scales: list[int]
    epochs: float  # max_steps x batch / images
    reasons: list[str] = field(default_factory=list)  # one line per decision

    def to_dict(self) -> dict:
        return asdict(self)


def _round_size(value: float) -> int:
    step = 32 if value >= 64 else 16
    return max(step, int(round(value / step)) * step)


def plan_sizes(stats: DatasetStats, eval_size: int) -> tuple[int, int, list[int], str]:
    """(eval_size, max_size, train_scales, reason) by rule 2."""
    size = min(float(eval_size), stats.median_short_side)
    why = f"pretrained {eval_size} px, images' median shorter side {stats.median_short_side:.0f} px"
    object_px = stats.median_object_rel * size
    if object_px < MIN_OBJECT_PX:
        wanted = MIN_OBJECT_PX / max(stats.median_object_rel, 1e-6)
        size = min(wanted, 2.0 * eval_size, 2.0 * stats.median_short_side)
        why += f", median object {object_px:.1f} px -> enlarged"
    size_px = _round_size(size)
    low = _round_size(TRAIN_SCALE_LOW * size_px)
    step = 32 if size_px >= 64 else 16
    scales = list(range(low, size_px + 1, step)) or [size_px]
    if scales[-1] != size_px:
        scales.append(size_px)
    max_size = int(math.ceil(size_px * max(MAX_TO_EVAL_RATIO, stats.median_aspect)))
    return size_px, max_size, scales, why


def default_epochs(images: int) -> float:
    """Rule 3's epoch count when no budget is given."""
    return min(100.0, max(12.0, 12.0 * math.sqrt(50000 / images)))


def plan_steps(stats: DatasetStats, budget: Budget, batch: int, step_s: float | None,
               step_source: str = "") -> tuple[int, str]:
    """(max_steps, reason) by rule 3; ``step_s`` is the step time at this batch and size."""
    if budget.steps is not None:
        return budget.steps, "--steps"
    if budget.minutes is not None:
        if not step_s or step_s <= 0:
            raise PlanError("--minutes needs a step time; give --steps instead")
        steps = max(1, int(budget.minutes * 60 / step_s))
        return steps, f"{budget.minutes:g} min / {step_s:.2f} s per step ({step_source})"
    epochs = default_epochs(stats.images)
    steps = max(MIN_DEFAULT_STEPS, int(math.ceil(epochs * stats.images / batch)))
    return steps, f"{epochs:.0f} epochs of {stats.images} images (no budget given)"


def plan_schedule(stats: DatasetStats, budget: Budget, pretrained: PretrainedRecipe,
                  step_time: StepTime | None = None) -> Schedule:
    """The whole rule (module docstring)."""
    batch = max(1, min(pretrained.batch_size, stats.images))
    eval_size, max_size, scales, size_why = plan_sizes(stats, pretrained.eval_size)
    mean_scale = sum(scales) / len(scales)
    pixels = batch * mean_scale * mean_scale * stats.median_aspect
    step_s = step_time.for_pixels(pixels) if step_time else None
    steps, steps_why = plan_steps(stats, budget, batch, step_s,
                                  step_time.source if step_time else "")
    warmup = min(MAX_WARMUP, int(round(WARMUP_FRACTION * steps)))
    drop = int(round(LR_DROP_AT * steps))
    milestones = [drop] if warmup < drop < steps else []
    reasons = [f"batch {batch} (pretrained recipe's, at most the {stats.images} images)",
               f"eval size {eval_size} px, train scales {scales[0]}..{scales[-1]} px, max "
               f"{max_size} px ({size_why})",
               f"{steps} steps: {steps_why}",
               f"warmup {warmup} steps; lr {pretrained.lr:g} x{LR_DROP_GAMMA:g} at "
               f"{milestones or 'no step (too short)'}"]
    return Schedule(batch, steps, warmup, milestones, pretrained.lr, eval_size, max_size, scales,
                    round(steps * batch / stats.images, 2), reasons)


def measured_step_time(metrics_file: Path, batch_size: int, eval_size: int) -> StepTime | None:
    """The median logged ``train/step_time_s`` of a finished run (its logs/metrics.jsonl), for
    a batch of ``batch_size`` images of about eval_size^2 pixels; None when there is none."""
    if not metrics_file.is_file():
        return None
    times = []
    for line in metrics_file.read_text().splitlines():
        try:
            value = (json.loads(line).get("metrics") or {}).get("train/step_time_s")
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(value, (int, float)) and value > 0:
            times.append(float(value))
    if not times:
        return None
    pixels = batch_size * eval_size * eval_size * MAX_TO_EVAL_RATIO ** 0.5
    return StepTime(statistics.median(times), pixels, f"measured, {metrics_file}")


def estimated_step_time(device: str) -> StepTime:
    """ESTIMATED_S_PER_MEGAPIXEL for the device ("cpu" or "cuda")."""
    seconds = ESTIMATED_S_PER_MEGAPIXEL["cuda" if device.startswith("cuda") else "cpu"]
    return StepTime(seconds, 1e6, f"estimated for {device}")
