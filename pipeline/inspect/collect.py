"""One image through the model with the decoder trace on -> the inspector's record of it.

The record (plain JSON types) holds, per query shown: its box, score, rank among all queries,
class distribution, box at every decoder layer and, for deformable decoders, every layer's
sampling points (image pixels, level, head, attention weight); per ground-truth object: the query
Hungarian matching assigns to it with the matching cost split into class / L1 / GIoU (the
matcher's own ``cost_pieces``), that query's score and rank, the best-IoU query and a verdict
(``verdicts.py``). Boxes are x0, y0, x1, y1 pixels of the image as given.

Segmenters are matched on the box costs only (the mask costs need annotated masks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from pipeline.boxes import box_cxcywh_to_xyxy, box_iou
from pipeline.data.collate import model_images
from pipeline.eval.segmentation_inference import resize_mask_logits
from pipeline.inference.images import prepare_batch
from pipeline.inspect.ground_truth import GroundTruth
from pipeline.inspect.verdicts import verdict
from pipeline.losses.matcher import HungarianMatcher, MatcherConfig
from pipeline.models.trace import DecoderTrace, record_decoder

CLASSES_SHOWN = 3  # most likely classes listed per query


@dataclass
class InspectConfig:
    """What the inspector shows."""

    score_threshold: float = 0.3  # the score a user would keep detections at (verdicts use it)
    top_k: int = 10  # queries shown per image, by score (matched ones are always added)
    min_side: int = 512  # pictures are upscaled until their longer side reaches this (pixels)

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must lie in [0, 1], got {self.score_threshold}")
        if self.top_k < 1 or self.min_side < 1:
            raise ValueError(f"top_k and min_side must be >= 1, got {self.top_k}, {self.min_side}")


@dataclass
class ImageOutputs:
    """One image's raw results: what the record is built from and the pictures drawn from."""

    probs: Tensor  # (Q, C) class probabilities (softmax: without no-object)
    boxes: Tensor  # (Q, 4) x0, y0, x1, y1 pixels
    layer_boxes: Tensor  # (layers, Q, 4) pixels
    points: list[Tensor]  # per layer (Q, H, L, P, 2) pixels; empty for single-scale DETR
    weights: list[Tensor]  # per layer (Q, H, L, P)
    masks: Tensor | None  # segmenter: (Q, H, W) bool at the image size


def matcher_for(meta: dict, focal: bool) -> HungarianMatcher:
    """The matcher of the model's training recipe (its export's config.criterion)."""
    criterion = (meta.get("config") or {}).get("criterion") or {}
    names = {f.name for f in dataclasses.fields(MatcherConfig)}
    cfg = MatcherConfig(**{k: v for k, v in (criterion.get("matcher") or {}).items() if k in names})
    return HungarianMatcher.from_config(cfg, focal, float(criterion.get("focal_alpha", 0.25)),
                                        float(criterion.get("focal_gamma", 2.0)))


def _to_pixels(boxes: Tensor, width: int, height: int) -> Tensor:
    return box_cxcywh_to_xyxy(boxes.float()) * torch.tensor([width, height, width, height])


@torch.no_grad()
def run_image(model, spec, image: Image.Image, device: torch.device) -> tuple[ImageOutputs, dict]:
    """-> (ImageOutputs, raw {"pred_logits" (1, Q, C), "pred_boxes" (1, Q, 4)}) of one image."""
    batch = prepare_batch([image], spec.eval_size, spec.max_size, spec.size_divisibility)
    inputs = model_images(batch, device, torch.float32)
    with record_decoder(model) as trace:
        out = model(inputs, batch["padding_mask"].to(device))
    logits = out["pred_logits"][0].float().cpu()
    probs = logits.sigmoid() if spec.focal else logits.softmax(-1)[:, :-1]
    width, height = image.size
    masks = None
    if "pred_masks" in out:
        masks = resize_mask_logits(out["pred_masks"][0].cpu(), batch["images"].shape[-2:],
                                   batch["sizes"][0], (height, width)) > 0
    points, weights = _points(trace, width, height)
    layer_boxes = torch.stack([_to_pixels(b[0].cpu(), width, height) for b in trace.layer_boxes])
    raw = {"pred_logits": logits[None], "pred_boxes": out["pred_boxes"][:1].float().cpu()}
    return ImageOutputs(probs, _to_pixels(raw["pred_boxes"][0], width, height), layer_boxes,
                        points, weights, masks), raw


def _points(trace: DecoderTrace, width: int, height: int) -> tuple[list[Tensor], list[Tensor]]:
    scale = torch.tensor([width, height], dtype=torch.float32)
    points = [trace.image_locations(i)[0].float().cpu() * scale for i in range(len(trace.attention))]
    return points, [w[0].float().cpu() for w in trace.attention_weights]


def _round(values: Tensor, digits: int = 2) -> list:
    return torch.round(values.float(), decimals=digits).tolist()


def query_record(index: int, outputs: ImageOutputs, rank: int, names: list[str]) -> dict:
    """One query: box, score, rank, top classes, box per layer, sampling points per layer as
    [head, level, x, y, weight] rows (pixels of the image)."""
    probs = outputs.probs[index]
    top = probs.topk(min(CLASSES_SHOWN, len(probs)))
    record = {"query": index, "rank": rank, "score": round(float(probs.max()), 4),
              "label": int(probs.argmax()), "name": names[int(probs.argmax())],
              "box": _round(outputs.boxes[index]),
              "classes": [[names[int(c)], round(float(p), 4)] for p, c in zip(*top)],
              "layer_boxes": _round(outputs.layer_boxes[:, index]), "points": []}
    for points, weights in zip(outputs.points, outputs.weights):
        heads, levels, count = weights.shape[1:]
        grid = torch.stack(torch.meshgrid(torch.arange(heads), torch.arange(levels), torch.arange(count),
                                          indexing="ij")[:2], -1).float()
        rows = torch.cat([grid, points[index], weights[index][..., None]], -1).reshape(-1, 5)
        record["points"].append([[int(r[0]), int(r[1]), round(float(r[2]), 1), round(float(r[3]), 1),
                                  round(float(r[4]), 4)] for r in rows])
    if outputs.masks is not None:
        record["mask_area"] = int(outputs.masks[index].sum())
    return record


def ground_truth_rows(outputs: ImageOutputs, raw: dict, gt: GroundTruth, matcher: HungarianMatcher,
                      ranks: Tensor, names: list[str], threshold: float, size: tuple[int, int]) -> list[dict]:
    """One row per annotated object (see the module docstring)."""
    if len(gt.labels) == 0:
        return []
    target = gt.target(*size)
    (pred_idx, tgt_idx), = matcher(raw, [target])
    assigned = dict(zip(tgt_idx.tolist(), pred_idx.tolist()))
    pieces = {k: v[0] for k, v in matcher.cost_pieces(raw, [target]).items()}
    ious = box_iou(outputs.boxes, gt.boxes_xyxy)[0]  # (Q, n)
    scores = outputs.probs.max(-1).values
    rows = []
    for t in range(len(gt.labels)):
        q, best = assigned.get(t), int(ious[:, t].argmax())
        costs = {k: round(float(pieces[k][q, t]), 4) for k in ("class", "bbox", "giou")} if q is not None else {}
        rows.append({
            "object": t, "annotation_id": gt.annotation_ids[t], "label": int(gt.labels[t]),
            "name": names[int(gt.labels[t])], "box": _round(gt.boxes_xyxy[t]),
            "matched_query": q, "cost": {**costs, "total": round(sum(costs.values()), 4)} if costs else {},
            "matched_score": round(float(scores[q]), 4) if q is not None else None,
            "matched_rank": int(ranks[q]) if q is not None else None,
            "matched_iou": round(float(ious[q, t]), 4) if q is not None else None,
            "best_query": best, "best_iou": round(float(ious[best, t]), 4),
            "best_score": round(float(scores[best]), 4),
            "verdict": verdict(ious[:, t], scores, threshold),
        })
    return rows


def inspect_outputs(outputs: ImageOutputs, raw: dict, gt: GroundTruth | None, matcher: HungarianMatcher,
                    names: list[str], cfg: InspectConfig, size: tuple[int, int]) -> dict:
    """-> {"queries": [...], "ground_truth": [...]} (queries: the top-k by score, then those a
    ground-truth row points at)."""
    scores = outputs.probs.max(-1).values
    order = scores.argsort(descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    rows = ground_truth_rows(outputs, raw, gt, matcher, ranks, names, cfg.score_threshold, size) if gt else []
    shown = order[:cfg.top_k].tolist()
    for row in rows:
        shown += [q for q in (row["matched_query"], row["best_query"]) if q is not None and q not in shown]
    return {"queries": [query_record(q, outputs, int(ranks[q]), names) for q in shown],
            "ground_truth": rows}
