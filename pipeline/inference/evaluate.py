"""COCO evaluation of a Predictor: on a shard split (batched by the stage's own evaluation
loader, so the numbers equal the stage's) or on a raw COCO json + image folder.

Detections come from ``Predictor.predict_batch`` (the stage's post-processing); this module only
feeds batches and collects the COCO numbers plus a per-class AP table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.eval.coco import CocoEvaluator
from pipeline.inference.images import load_image, prepare_batch
from pipeline.inference.predictor import Predictor


class Harness:
    """A Predictor seen through the strategy interface the stage evaluation functions take
    (``module``, ``device``, ``compute_dtype``, ``autocast()``)."""

    def __init__(self, predictor: Predictor):
        self.module, self.device = predictor.model, predictor.device
        self.compute_dtype = torch.float32  # bf16 runs through autocast, inputs stay fp32
        self.autocast = predictor.autocast


def per_class_ap(evaluator: CocoEvaluator, names: list[str]) -> dict[str, float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each category the annotations have."""
    coco_eval = evaluator.evaluate()
    precision = coco_eval.eval["precision"]  # (T, R, K, A, M)
    name_of = dict(zip(evaluator.label_to_category_id.values(), names))
    table = {}
    for k, category_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        table[name_of.get(category_id, str(category_id))] = float(values.mean()) if values.size else float("nan")
    return table


def label_to_category_id(predictor: Predictor) -> list[int]:
    """The dataset category id of each contiguous label."""
    categories = predictor.spec.categories
    if not categories:
        return list(range(1, len(predictor.class_names) + 1))
    return [int(c["id"]) for c in categories]


def with_sizes(batch: dict) -> dict:
    """A loader batch plus the "sizes" / "orig_sizes" (B, 2) the post-processing reads."""
    targets = batch["targets"]
    return {**batch, "sizes": torch.stack([t["size"] for t in targets]),
            "orig_sizes": torch.stack([t["orig_size"] for t in targets])}


def evaluate_batches(predictor: Predictor, batches, annotation_file: str | Path | dict,
                     progress: Callable | None = None) -> dict:
    """{"metrics": the 12 COCO bbox numbers, "per_class_AP": {name: AP}} over loader batches
    ("images", "padding_mask", "targets" with "image_id", "size", "orig_size")."""
    top_k = int(predictor.spec.eval.get("top_k", 100))
    evaluator = CocoEvaluator(annotation_file, label_to_category_id(predictor))
    for batch in (progress(batches) if progress else batches):
        targets = batch["targets"]
        batch = with_sizes(batch)
        predictions = predictor.predict_batch(batch, top_k)
        evaluator.update([int(t["image_id"]) for t in targets],
                         [{"boxes": p.boxes, "scores": p.scores, "labels": p.labels} for p in predictions])
    metrics = evaluator.summarize()
    return {"metrics": metrics, "per_class_AP": per_class_ap(evaluator, predictor.class_names)}


def raw_coco_batches(annotation_file: Path, images_dir: Path, predictor: Predictor,
                     batch_size: int):
    """Batches of a COCO json's images read from images_dir, in the loader's batch format."""
    data = json.loads(Path(annotation_file).read_text())
    records = sorted(data["images"], key=lambda r: int(r["id"]))
    spec = predictor.spec
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        pictures = [load_image(Path(images_dir) / r["file_name"]) for r in chunk]
        batch = prepare_batch(pictures, spec.eval_size, spec.max_size, spec.size_divisibility)
        batch["targets"] = [{"image_id": torch.tensor(int(r["id"])), "size": size, "orig_size": orig}
                            for r, size, orig in zip(chunk, batch["sizes"], batch["orig_sizes"])]
        yield batch


def format_report(report: dict) -> str:
    """The metrics and the per-class table as printed by `detrforge eval`."""
    lines = [f"{name:>12s}  {value:.4f}" for name, value in report["metrics"].items()]
    table = report.get("per_class_AP") or {}
    if table:
        lines += ["", f"{'class':>20s}  AP"]
        lines += [f"{name:>20s}  {'n/a' if np.isnan(ap) else f'{ap:.4f}'}" for name, ap in table.items()]
    return "\n".join(lines)
