"""The recipe `detrforge finetune` writes: a plain ``domain_finetune`` recipe (``--task segment``:
``segment_finetune``), readable and editable.

Built from the pretrained export's meta.json (architecture, and the recipe it was trained with)
and the planned :class:`~pipeline.finetune_plan.Schedule`. Only keys the current schemas know are
copied from the pretrained recipe, so an export made by an older version still gives a valid
recipe. Paths are written relative to the recipe's folder (the project's rule for paths in
files), so the folder can be moved with its data set and weights.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from pipeline.data.detection import DetectionDataConfig
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.strategy import StrategyConfig
from pipeline.eval.detection import DetectionEvalConfig
from pipeline.finetune_plan import Schedule
from pipeline.losses.set_criterion import CriterionConfig
from pipeline.models.mask_head import SegmenterConfig

STAGE_KIND = "domain_finetune"
SEGMENT_STAGE_KIND = "segment_finetune"
# configs/stages/segment_finetune/tiny.yaml's mask losses (Mask2Former's weights) and sampled
# points: 28 x 28 per 32 x 32 mask there, at most Mask2Former's 112 x 112.
MASK_WEIGHTS = {"mask": 5.0, "dice": 5.0}
MASK_POINTS_PER_SIDE, MAX_MASK_POINTS_SIDE = 28 / 32, 112
# DETR's crop branch at its 800 px evaluation size, scaled to the planned size.
DETR_EVAL_SIZE = 800
DETR_CROP = {"crop_resize_scales": [400, 500, 600], "crop_min_size": 384, "crop_max_size": 600}


def _nested_types(schema: type) -> dict[str, type]:
    import typing

    hints = typing.get_type_hints(schema)
    return {name: hint for name, hint in hints.items()
            if isinstance(hint, type) and dataclasses.is_dataclass(hint)}


def filtered(schema: type, data: Any) -> dict:
    """``data`` without the keys ``schema`` (a dataclass; nested ones followed) does not have,
    so a recipe from an older version still validates."""
    if not isinstance(data, dict):
        return {}
    nested = _nested_types(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    return {k: (filtered(nested[k], v) if k in nested else v) for k, v in data.items()
            if k in names}


def data_section(source: dict, schedule: Schedule, shards: str, images: int) -> dict:
    """The data keys: the pretrained recipe's loader settings, the planned sizes, DETR's crop
    branch scaled to the planned size."""
    ratio = schedule.eval_size / DETR_EVAL_SIZE
    crop = {"crop_resize_scales": [max(16, int(s * ratio)) for s in DETR_CROP["crop_resize_scales"]],
            "crop_min_size": max(16, int(DETR_CROP["crop_min_size"] * ratio)),
            "crop_max_size": max(16, int(DETR_CROP["crop_max_size"] * ratio))}
    kept = {k: v for k, v in filtered(DetectionDataConfig, source).items()
            if k in ("num_workers", "crop_prob", "flip_prob", "size_divisibility")}
    return {"shards": shards, **kept, "batch_size": schedule.batch_size,
            "train_scales": schedule.train_scales, "eval_size": schedule.eval_size,
            "max_size": schedule.max_size, **crop,
            "shuffle_buffer": max(1, min(int(source.get("shuffle_buffer", 500)), images))}


def model_section(detector: dict) -> dict:
    """The pretrained architecture; the class count comes from the data, the weights from
    init_from (never a backbone file of the machine it was trained on)."""
    model = {k: v for k, v in detector.items() if k != "num_classes"}
    model["backbone"] = {**(model.get("backbone") or {}), "weights": None, "pretrained": False}
    return model


def optim_section(source: dict, schedule: Schedule) -> dict:
    kept = filtered(OptimizerConfig, source)
    return {**kept, "lr": schedule.lr, "schedule": "step", "warmup_steps": schedule.warmup_steps,
            "milestones": schedule.milestones, "gamma": 0.1}


def strategy_section(source: dict, processes: int) -> dict:
    """The pretrained recipe's strategy; several processes need DeepSpeed (ZeRO-2 by default)."""
    strategy = filtered(StrategyConfig, source)
    if processes > 1 and strategy.get("kind", "deepspeed") != "deepspeed":
        strategy.update(kind="deepspeed", zero_stage=2)
    return strategy


def relative(path: Path, start: Path) -> str:
    """path relative to start when both are on one drive (a recipe's paths are relative to it)."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:
        return str(Path(path).resolve())


def build_recipe(meta: dict, schedule: Schedule, shards: Path, init_export: Path,
                 recipe_dir: Path, images: int, processes: int = 1, seed: int = 0) -> dict:
    """The recipe as plain data (written as YAML by the caller)."""
    config = meta.get("config") or {}
    steps = schedule.max_steps
    return {
        "stage": STAGE_KIND,
        "data": data_section(config.get("data") or {}, schedule,
                             relative(shards, recipe_dir), images),
        "init_from": relative(init_export, recipe_dir),
        "model": model_section(meta["detector"]),
        "criterion": filtered(CriterionConfig, config.get("criterion") or {}),
        "optim": optim_section(config.get("optim") or {}, schedule),
        "strategy": strategy_section(config.get("strategy") or {}, processes),
        "train": {"max_steps": steps, "log_every": max(1, min(10, steps // 10)),
                  "checkpoint_every": max(1, min(500, steps // 4)), "seed": seed,
                  "processes": processes},
        "eval": filtered(DetectionEvalConfig, config.get("eval") or {}),
        "freeze": "none",
    }


class RecipeError(ValueError):
    """The pretrained model cannot become the asked-for stage's model."""


def segmenter_section(detector: dict, source: str) -> dict:
    """The detector plus a mask head as wide as its transformer (tiny.yaml, Mask2Former: equal),
    at stride 4; RecipeError naming ``source`` when the detector cannot carry one."""
    model = {"detector": model_section(detector),
             "mask_head": {"mask_dim": int(detector.get("hidden_dim", 256)), "pixel_stride": 4},
             "mask_attention": "none"}
    try:
        SegmenterConfig(**model)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"--task segment: the detector of {source} cannot take a mask head "
                          f"({err}); start from a Deformable DETR or DINO export") from None
    return model


def mask_points(eval_size: int, pixel_stride: int = 4) -> int:
    """Points sampled per mask: a square of 28/32 of the mask's side, at most 112 x 112."""
    side = min(MAX_MASK_POINTS_SIDE, max(1, round(eval_size / pixel_stride * MASK_POINTS_PER_SIDE)))
    return side * side


def build_segment_recipe(meta: dict, schedule: Schedule, shards: Path, init_export: Path,
                         recipe_dir: Path, images: int, panoptic_dir: Path, source: str,
                         processes: int = 1, seed: int = 0) -> dict:
    """The ``segment_finetune`` recipe: the detection recipe's data, schedule and strategy, the
    detector with a mask head, mask losses, segmentation evaluation, the panoptic view."""
    recipe = build_recipe(meta, schedule, shards, init_export, recipe_dir, images, processes, seed)
    detector = meta["detector"]
    criterion = recipe["criterion"]
    criterion["weights"] = {**criterion.get("weights", {}), **MASK_WEIGHTS}
    criterion["masks"] = {"num_points": mask_points(schedule.eval_size)}
    # Mask DINO's panoptic thresholds for sigmoid (focal) class scores, which run lower than
    # MaskFormer's softmax ones; a short fine-tune's scores stay lower still (PQ counts no query
    # then, while mask AP, which ranks them, does): eval.object_mask_threshold=0.15 shows them.
    evaluation = {"object_mask_threshold": 0.25, "overlap_threshold": 0.8,
                  "pictures": recipe["eval"].get("pictures", 4)}
    return {"stage": SEGMENT_STAGE_KIND, "data": recipe["data"], "init_from": recipe["init_from"],
            "panoptic_annotations": relative(panoptic_dir, recipe_dir),
            "model": segmenter_section(detector, source),
            "criterion": criterion, "optim": recipe["optim"], "strategy": recipe["strategy"],
            "train": recipe["train"], "eval": evaluation}
