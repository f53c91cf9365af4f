"""The DINO criterion: DETR's set losses (per Group-DETR query group) plus the denoising losses.

- ``class_loss``: "focal" (Deformable-DETR) or "varifocal" (the matched box's IoU as the soft
  class target, see varifocal.py), for the matching and the denoising queries alike.
- Query groups (outputs["query_groups"] = K > 1): each group of Q queries is matched and lossed
  on its own; the K values of each key are averaged, so the loss scale (and the lr that suits it)
  does not change with K. Encoder proposals ("_enc") are lossed once.
- Denoising (outputs["dn_meta"], from ``pipeline/models/dino.py``): the positive slot of each
  target is its prediction (no matching); every other slot, negatives and padding, is trained as
  "no object". Keys ``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` for the last layer and
  ``..._dn_{i}`` for auxiliary layer i, divided by ``num_boxes * groups`` as DINO. A segmenter's
  denoising masks add ``loss_mask_dn`` / ``loss_dice_dn`` (Mask DINO), for the positives only: the
  mask of the target each was made from; negatives and padding get no mask loss. A batch with no
  box still returns every key (zeros attached to the graph): ranks log the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.boxes import box_cxcywh_to_xyxy, box_iou
from pipeline.losses.matcher import HungarianMatcher
from pipeline.losses.set_criterion import (
    CriterionConfig,
    SetCriterion,
    average_num_boxes,
    batch_permutation_index,
)
from pipeline.losses.varifocal import varifocal_loss

CLASS_LOSSES = ("focal", "varifocal")
BOX_LOSS_KEYS = ("loss_ce", "loss_bbox", "loss_giou")
MASK_LOSS_KEYS = ("loss_mask", "loss_dice")


@dataclass(frozen=True)
class DenoisingLayout:
    """The slot layout of a batch's denoising queries (pipeline/models/denoising.py)."""

    groups: int
    max_boxes: int

    def positive_indices(self, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Per image (slot_idx, target_idx) of the positives: slot g * 2M + j is target j."""
        indices = []
        for target in targets:
            count = len(target["labels"])
            slots = torch.cat([torch.arange(count) + g * 2 * self.max_boxes for g in range(self.groups)])
            indices.append((slots.long(), torch.arange(count).repeat(self.groups).long()))
        return indices


class DinoCriterion(SetCriterion):
    """SetCriterion with varifocal classification, query groups and denoising losses."""

    handles_denoising = True

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_loss: str = "focal", **kwargs) -> None:
        super().__init__(num_classes, matcher, **kwargs)
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"criterion.class_loss must be one of {CLASS_LOSSES}, got {class_loss!r}")
        if class_loss == "varifocal" and not self.focal:
            raise ValueError("criterion.class_loss=varifocal needs a sigmoid (focal) class head, not DETR's softmax")
        self.class_loss = class_loss

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_boxes: Tensor) -> Tensor:
        """Focal (SetCriterion) or varifocal loss of (B, Q, C) logits, fp32."""
        if self.class_loss == "focal":
            return super().loss_labels(outputs, targets, indices, num_boxes)
        logits = outputs["pred_logits"].float()
        classes = self.matched_classes(logits, targets, indices)
        onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        score = torch.zeros(logits.shape[:2], device=logits.device)
        score[batch_permutation_index(indices)] = matched_iou(outputs, targets, indices)
        return varifocal_loss(logits, onehot * score[..., None], num_boxes, gamma=self.focal_gamma) * logits.shape[1]

    def forward(self, outputs: dict, targets: list[dict],
                canvas_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """SetCriterion's keys (averaged over query groups) + the ``_dn`` keys in training."""
        losses = self.grouped_losses(outputs, targets, canvas_size)
        if "dn_meta" in outputs:
            losses.update(self.denoising_losses(outputs, targets, canvas_size))
        return losses

    def grouped_losses(self, outputs: dict, targets: list[dict], canvas_size) -> dict[str, Tensor]:
        groups = outputs.get("query_groups", 1)
        if groups == 1:
            return super().forward(outputs, targets, canvas_size)
        per_group = [super(DinoCriterion, self).forward(query_group(outputs, g, groups), targets, canvas_size)
                     for g in range(groups)]
        return {key: value if key.endswith("_enc") else torch.stack([g[key] for g in per_group]).mean()
                for key, value in per_group[0].items()}

    def denoising_losses(self, outputs: dict, targets: list[dict],
                         canvas_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """``loss_{ce,bbox,giou}_dn[_i]`` (+ ``loss_{mask,dice}_dn[_i]`` when the outputs hold
        "pred_masks") of the denoising part; zeros when it is None."""
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)  # every rank reduces
        dn, meta = outputs["dn_outputs"], outputs["dn_meta"]
        suffixes = ["_dn"] + [f"_dn_{i}" for i in range(len(outputs.get("aux_outputs") or []))]
        keys = BOX_LOSS_KEYS + (MASK_LOSS_KEYS if "pred_masks" in outputs else ())
        if dn is None:
            zero = outputs["pred_logits"].sum() * 0.0
            return {key + suffix: zero for suffix in suffixes for key in keys}
        layout = DenoisingLayout(meta["groups"], meta["max_boxes"])
        indices = layout.positive_indices(targets)
        num_boxes = num_boxes * layout.groups
        losses = {}
        for layer, suffix in zip([dn, *dn["aux_outputs"]], suffixes):
            layer_losses = {"loss_ce": self.loss_labels(layer, targets, indices, num_boxes),
                            **self.loss_boxes(layer, targets, indices, num_boxes)}
            if "pred_masks" in layer:
                layer_losses.update(self.loss_masks(layer, targets, indices, num_boxes, canvas_size))
            losses.update({key + suffix: value for key, value in layer_losses.items()})
        return losses


def build_dino_criterion(cfg: CriterionConfig, num_classes: int, focal: bool) -> DinoCriterion:
    """The criterion of ``cfg`` with its ``class_loss``, groups and denoising losses; ``focal``
    is the model's (``DetectorConfig.focal``)."""
    matcher = HungarianMatcher.from_config(cfg.matcher, focal, cfg.focal_alpha, cfg.focal_gamma)
    return DinoCriterion(num_classes, matcher, class_loss=cfg.class_loss,
                         focal=focal, focal_alpha=cfg.focal_alpha,
                         focal_gamma=cfg.focal_gamma, eos_coef=cfg.eos_coef, mask_loss=cfg.masks)


def query_group(outputs: dict, group: int, groups: int) -> dict:
    """Group ``group``'s columns of the matching outputs (encoder proposals and selected tokens
    with group 0 only)."""
    width = outputs["pred_logits"].shape[1] // groups
    cols = slice(group * width, (group + 1) * width)

    def part(layer: dict) -> dict:
        return {key: layer[key][:, cols] for key in ("pred_logits", "pred_boxes", "pred_masks") if key in layer}

    sub = {**part(outputs), "aux_outputs": [part(aux) for aux in outputs.get("aux_outputs") or []]}
    if group == 0:
        sub.update({key: outputs[key] for key in ("enc_outputs", "enc_selected") if outputs.get(key) is not None})
    return sub


@torch.no_grad()
def matched_iou(outputs: dict, targets: list[dict], indices: list) -> Tensor:
    """(M,) IoU of each matched predicted box with its target box (no gradient: a target)."""
    pred = outputs["pred_boxes"][batch_permutation_index(indices)].float()
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred.device).float()
    if len(pred) == 0:
        return pred.new_zeros(0)
    return torch.diag(box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))[0])
