"""Wiring of the segmentation stage: the panoptic view of a detection shard set, the task step,
and evaluation (COCO segm AP, PQ, mIoU) with pictures.

Training targets are the shards' thing instances plus, with the panoptic view, one mask per stuff
segment read from ``<annotations>/panoptic_<split>/<png>`` (stuff labels follow the thing labels),
so the segmenter learns things and stuff as Mask2Former does. Evaluation reads the original
panoptic PNGs and json, so PQ and mIoU are measured at the original image size.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from pipeline import dist
from pipeline.data.collate import collate_detection, model_images
from pipeline.data.decoding import coco_target, decode_jpeg, decode_json
from pipeline.data.detection import DetectionDataConfig, build_detection_transform
from pipeline.data.errors import DataError
from pipeline.data.eval_stream import EvalLoader
from pipeline.data.shards import load_shard_info
from pipeline.data.stream import TrainLoader
from pipeline.data.transforms import DetectionAugment, DetectionEval, to_model_inputs
from pipeline.eval.coco import CocoEvaluator
from pipeline.eval.panoptic import PanopticEvaluator, load_panoptic_json, read_panoptic_png
from pipeline.eval.segmentation_inference import (
    PanopticInferenceConfig,
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    semantic_inference,
)
from pipeline.eval.semantic import SemanticEvaluator, panoptic_to_semantic
from pipeline.losses.set_criterion import SetCriterion
from stages.detection_common import IMAGENET_MEAN, IMAGENET_STD, move_targets


@dataclass
class SegmentationEvalConfig:
    """How the segmenter is evaluated."""

    top_k: int = 100  # instance predictions kept per image for segm AP
    object_mask_threshold: float = 0.8  # panoptic: queries kept above this class score
    overlap_threshold: float = 0.8  # panoptic: segments kept when this share of their mask is visible
    pictures: int = 4  # val images saved with predicted segments and boxes (0 = none)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.pictures < 0:
            raise ValueError("eval.top_k must be >= 1 and eval.pictures >= 0")
        PanopticInferenceConfig(self.object_mask_threshold, self.overlap_threshold)  # validates


@dataclass(frozen=True)
class PanopticView:
    """The panoptic annotations of one split: categories in label order (things of the shards
    first, then stuff), and per image id its PNG path and segments_info."""

    categories: tuple[dict, ...]
    images: dict  # image id -> (png path str, segments_info list)

    @property
    def label_of(self) -> dict[int, int]:
        return {int(c["id"]): label for label, c in enumerate(self.categories)}

    @property
    def is_thing(self) -> list[bool]:
        return [bool(c.get("isthing", 1)) for c in self.categories]


def load_panoptic_view(annotations_dir: Path, split: str, thing_categories: list[dict]) -> PanopticView:
    """Read ``panoptic_<split>.json``; things keep the shards' label order, stuff follows."""
    data = load_panoptic_json(Path(annotations_dir) / f"panoptic_{split}.json")
    thing_ids = {int(c["id"]) for c in thing_categories}
    stuff = [c for c in data["categories"] if not c.get("isthing", 1) and int(c["id"]) not in thing_ids]
    categories = tuple([{**c, "isthing": 1} for c in thing_categories] + [dict(c) for c in stuff])
    folder = Path(annotations_dir) / f"panoptic_{split}"
    images = {int(a["image_id"]): (str(folder / a["file_name"]), a["segments_info"]) for a in data["annotations"]}
    return PanopticView(categories, images)


def _stuff_annotations(view: PanopticView, image_id: int) -> list[dict]:
    """One COCO annotation (RLE) per stuff segment of the image's panoptic PNG."""
    if image_id not in view.images:
        return []
    png, segments = view.images[image_id]
    thing = dict(zip(view.label_of, view.is_thing))
    stuff = [s for s in segments if not thing.get(int(s["category_id"]), True)]
    if not stuff:
        return []
    ids = read_panoptic_png(png)
    annotations = []
    for segment in stuff:
        mask = ids == int(segment["id"])
        if not mask.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({"category_id": int(segment["category_id"]), "iscrowd": 0,
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": int(mask.sum()),
                            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}})
    return annotations


@dataclass(frozen=True)
class SegmentationDecoder:
    """Raw shard sample -> (image, target with masks of things and, with a view, stuff)."""

    label_of: dict[int, int]
    transform: DetectionAugment | DetectionEval
    view: PanopticView | None

    def __call__(self, raw: dict, rng: random.Random | None, dropped: Counter):
        key = raw.get("__key__", "?")
        record = decode_json(raw.get("json"), key)
        image = decode_jpeg(raw.get("jpg"), key)
        if self.view is not None:
            image_id = int(record["image"].get("id", -1))
            record = {**record, "annotations": record.get("annotations", []) + _stuff_annotations(self.view, image_id)}
        target = coco_target(record, image.size, self.label_of, True, dropped)
        image, target = self.transform(image, target, rng)
        return to_model_inputs(image, target)


def build_segmentation_loader(cfg: DetectionDataConfig, split: str, view: PanopticView | None,
                              rank: int = 0, world_size: int = 1, seed: int = 0):
    """Like ``build_detection_loader`` with masks always on and stuff segments from ``view``."""
    info = load_shard_info(Path(cfg.shards) / split)
    if info.kind != "detection":
        raise DataError(f"{info.root} holds {info.kind} shards; the segmentation stage needs detection shards")
    categories = list(view.categories) if view is not None else info.categories
    label_of = {int(c["id"]): label for label, c in enumerate(categories)}
    train = split in cfg.train_splits
    decode = SegmentationDecoder(label_of, build_detection_transform(cfg, train), view)
    collate = partial(collate_detection, size_divisibility=cfg.size_divisibility)
    if train:
        steps = cfg.steps_per_epoch or max(1, info.num_samples // (cfg.batch_size * world_size))
        return TrainLoader(info, decode, collate, batch_size=cfg.batch_size, steps_per_epoch=steps,
                           num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                           rank=rank, world_size=world_size)
    return EvalLoader(info, decode, collate, batch_size=cfg.eval_batch_size or cfg.batch_size,
                      num_workers=cfg.num_workers, rank=rank, world_size=world_size)


def segmentation_task_step(criterion: SetCriterion, weights: dict[str, float], freeze_steps: int):
    """batch -> (weighted loss, logged metrics); masks are compared on the padded canvas."""
    logged_keys = ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")

    def task_step(strategy, state, batch):
        model = strategy.module.module if hasattr(strategy.module, "module") else strategy.module
        if hasattr(model, "set_backbone_frozen"):
            model.set_backbone_frozen(state.step < freeze_steps)
        images = model_images(batch, strategy.device, strategy.compute_dtype)
        outputs = strategy.module(images, batch["padding_mask"].to(strategy.device))
        losses = criterion(outputs, move_targets(batch["targets"], strategy.device),
                           canvas_size=tuple(images.shape[-2:]))
        total = SetCriterion.weighted_total(losses, weights)
        return total, {k: float(v.detach()) for k, v in losses.items() if k in logged_keys}

    return task_step


def _palette(segment_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(segment_id)
    return tuple(int(v) for v in rng.integers(40, 256, 3))


def draw_segments(image: torch.Tensor, size: torch.Tensor, panoptic: torch.Tensor, segments: list[dict],
                  names: list[str], path: Path) -> None:
    """Save a (3, H, W) normalised image with its panoptic segments blended in and a box and
    name per thing segment, as PNG; ``panoptic`` (h0, w0) ids at any size (resized here)."""
    h, w = (int(s) for s in size)
    pixels = ((image.float().cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1) * 255)[:, :h, :w]
    picture = Image.fromarray(pixels.byte().permute(1, 2, 0).numpy())
    ids = np.asarray(Image.fromarray(panoptic.numpy().astype(np.int32)).resize((w, h), Image.NEAREST))
    colours = np.zeros((h, w, 3), np.uint8)
    for segment in segments:
        colours[ids == segment["id"]] = _palette(segment["id"])
    blended = Image.blend(picture, Image.fromarray(colours), 0.45)
    blended.paste(picture, mask=Image.fromarray(((ids == 0) * 255).astype(np.uint8)))
    draw = ImageDraw.Draw(blended)
    for segment in segments:
        ys, xs = np.nonzero(ids == segment["id"])
        if not segment["isthing"] or len(xs) == 0:
            continue
        draw.rectangle([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], outline=(255, 40, 40))
        draw.text((int(xs.min()) + 2, int(ys.min()) + 1), f"{names[segment['label']]} {segment['score']:.2f}",
                  fill=(255, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    blended.save(path)


@dataclass
class SegmentationMetrics:
    """The three evaluators of one evaluation pass."""

    coco: CocoEvaluator | None
    panoptic: PanopticEvaluator
    semantic: SemanticEvaluator

    def summarize(self) -> dict[str, float] | None:
        """Every rank calls it; the dict on the rank that holds the COCO results, else None."""
        self.panoptic.gather()
        self.semantic.gather()
        main = self.coco.gather() if self.coco is not None else dist.is_main()
        if not main:
            return None
        metrics = {**self.panoptic.summarize(), **self.semantic.summarize()}
        if self.coco is not None:
            metrics.update({f"segm_{k}": v for k, v in self.coco.summarize().items()})
        return metrics


def evaluate_image(metrics: SegmentationMetrics, view: PanopticView, logits: torch.Tensor,
                   mask_logits: torch.Tensor, image_id: int, focal: bool, eval_cfg: SegmentationEvalConfig):
    """Add one image's predictions (mask logits at the original size) -> (panoptic ids, segments)."""
    label_to_id = [int(c["id"]) for c in view.categories]
    num_things = sum(view.is_thing)
    if metrics.coco is not None:
        instances = instance_inference(logits, mask_logits, focal, eval_cfg.top_k)
        keep = instances["labels"] < num_things  # segm AP is on the instance (thing) annotations
        metrics.coco.update([image_id], [{k: v[keep] for k, v in instances.items()}])
    panoptic_cfg = PanopticInferenceConfig(eval_cfg.object_mask_threshold, eval_cfg.overlap_threshold)
    ids, segments = panoptic_inference(logits, mask_logits, focal, view.is_thing, panoptic_cfg)
    if image_id not in view.images:
        raise DataError(f"image {image_id} has no entry in the panoptic annotations; regenerate them "
                        "together with the shards")
    png, gt_segments = view.images[image_id]
    gt_ids = read_panoptic_png(png)
    predicted = [{"id": s["id"], "category_id": label_to_id[s["label"]]} for s in segments]
    metrics.panoptic.update(gt_ids, gt_segments, ids, predicted)
    metrics.semantic.update(semantic_inference(logits, mask_logits, focal),
                            panoptic_to_semantic(gt_ids, gt_segments, view.label_of))
    return ids, segments


def segmentation_evaluate(loader, view: PanopticView, instances_json: Path | None, focal: bool,
                          eval_cfg: SegmentationEvalConfig, pictures_dir: Path | None):
    """evaluate(strategy) -> PQ/SQ/RQ (all, _th, _st), mIoU, pixel_acc, segm_AP... (all ranks)."""
    names = [str(c.get("name", c["id"])) for c in view.categories]
    things = [int(c["id"]) for c in view.categories if c.get("isthing", 1)]

    def evaluate(strategy) -> dict[str, float]:
        coco = CocoEvaluator(instances_json, things, iou_type="segm") if instances_json else None
        metrics = SegmentationMetrics(coco, PanopticEvaluator(view.categories), SemanticEvaluator(len(names)))
        for index, batch in enumerate(loader):
            images = model_images(batch, strategy.device, strategy.compute_dtype)
            with strategy.autocast():
                outputs = strategy.module(images, batch["padding_mask"].to(strategy.device))
            logits, masks = outputs["pred_logits"].float().cpu(), outputs["pred_masks"].float().cpu()
            for i, target in enumerate(batch["targets"]):
                image_masks = resize_mask_logits(masks[i], images.shape[-2:], target["size"], target["orig_size"])
                ids, segments = evaluate_image(metrics, view, logits[i], image_masks, int(target["image_id"]),
                                               focal, eval_cfg)
                if index == 0 and i < eval_cfg.pictures and pictures_dir is not None and dist.is_main():
                    draw_segments(images[i], target["size"], ids, segments, names,
                                  pictures_dir / f"val_{i:02d}.png")
        result = metrics.summarize()
        return dist.broadcast_object(result) if dist.is_initialized() else result

    return evaluate
