"""Hungarian matching between a detector's queries and the ground-truth boxes of each image.

The cost of pairing query ``q`` with target ``t`` is a weighted sum of a classification cost, the L1
distance of the boxes and the negative generalized IoU, as in DETR. With ``focal=True`` the
classification cost is Deformable-DETR's focal cost on sigmoid probabilities; otherwise DETR's
``-softmax probability`` of the target class. Costs are computed for the whole batch at once and
then split per image, and each image is solved with ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from pipeline.boxes import box_cxcywh_to_xyxy, generalized_box_iou

# Added to the magnitude of the largest finite cost to replace NaN/inf entries: such a pair is
# never preferred to a finite one, and the solver never sees a non-finite value (it raises then).
NONFINITE_COST_MARGIN = 1e6

# Keeps the log finite when a probability reaches exactly 0 or 1 (the reference code's epsilon).
FOCAL_COST_EPS = 1e-8


@dataclass
class MatcherConfig:
    """Weights of the matching cost; defaults are Deformable-DETR's (DETR uses cost_class=1)."""

    cost_class: float = 2.0  # weight of the classification cost
    cost_bbox: float = 5.0  # weight of the L1 distance between cx, cy, w, h boxes
    cost_giou: float = 2.0  # weight of the negative generalized IoU
    focal: bool = True  # sigmoid focal cost (Deformable-DETR); False: -softmax prob (DETR)
    focal_alpha: float = 0.25  # focal cost's alpha (balance of positives and negatives)
    focal_gamma: float = 2.0  # focal cost's gamma (down-weights easy examples)

    def __post_init__(self) -> None:
        for name in ("cost_class", "cost_bbox", "cost_giou", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"MatcherConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("MatcherConfig: cost_class, cost_bbox and cost_giou are all 0; "
                             "set at least one of them > 0")
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"MatcherConfig.focal_alpha must lie in [0, 1], got {self.focal_alpha}")


def build_matcher(cfg: MatcherConfig) -> HungarianMatcher:
    """The matcher described by ``cfg``."""
    return HungarianMatcher(cost_class=cfg.cost_class, cost_bbox=cfg.cost_bbox,
                            cost_giou=cfg.cost_giou, focal=cfg.focal,
                            focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma)


def check_detection_inputs(outputs: dict, targets: list[dict], num_classes: int) -> None:
    """Raise ValueError (not an indexing error deep in torch) on malformed outputs or targets.

    ``num_classes`` is the number of labels a target may use: labels must lie in [0, num_classes).
    """
    logits, boxes = outputs.get("pred_logits"), outputs.get("pred_boxes")
    if logits is None or boxes is None:
        raise ValueError("detector outputs need 'pred_logits' (B, Q, C) and 'pred_boxes' (B, Q, 4); "
                         f"got keys {sorted(outputs)}")
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"pred_logits must be (B, Q, C) and pred_boxes (B, Q, 4) with the same B, Q; "
                         f"got {tuple(logits.shape)} and {tuple(boxes.shape)}")
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{len(targets)} target dicts for a batch of {logits.shape[0]} images: "
                         "pass one dict (possibly with no boxes) per image")
    for i, target in enumerate(targets):
        labels, tboxes = target["labels"], target["boxes"]
        if tboxes.dim() != 2 or tboxes.shape[-1] != 4 or len(tboxes) != len(labels):
            raise ValueError(f"targets[{i}]: 'boxes' must be (n, 4) and 'labels' (n,); got "
                             f"{tuple(tboxes.shape)} and {tuple(labels.shape)}")
    # One range check for the whole batch: on a GPU each check is a device synchronisation.
    all_labels = torch.cat([t["labels"].reshape(-1) for t in targets])
    lowest, highest = torch.stack([all_labels.min(), all_labels.max()]).tolist() if len(all_labels) else (0, 0)
    if lowest < 0 or highest >= num_classes:
        bad = next(i for i, t in enumerate(targets)
                   if len(t["labels"]) and not bool(((t["labels"] >= 0) & (t["labels"] < num_classes)).all()))
        raise ValueError(f"targets[{bad}]: labels must lie in [0, {num_classes}) for a head with "
                         f"{num_classes} classes, got {targets[bad]['labels'].tolist()}; check the "
                         "dataset's label mapping or num_classes")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the weighted matching cost.

    For each image ``len(pred_idx) == len(target_idx) == min(num_queries, num_targets)``; the
    unmatched queries are trained as background ("no object").
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal: bool = True, focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        MatcherConfig(cost_class, cost_bbox, cost_giou, focal, focal_alpha, focal_gamma)  # validates
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma
        # How many cost entries were NaN/inf since construction (a symptom of a diverging model).
        self.num_nonfinite_costs = 0

    def classification_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """(P, C) or (P, C+1) fp32 logits, (T,) labels -> (P, T) classification cost."""
        if not self.focal:
            return -logits.softmax(-1)[:, labels]
        # Element-wise, so selecting the target classes first gives the reference's values on a
        # (P, T) instead of a (P, C) tensor.
        prob = logits[:, labels].sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * prob**gamma * -(1 - prob + FOCAL_COST_EPS).log()
        pos_cost = alpha * (1 - prob) ** gamma * -(prob + FOCAL_COST_EPS).log()
        return pos_cost - neg_cost

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> Tensor:
        """(B, Q, T_total) fp32 cost of every query against every target of the whole batch."""
        batch_size, num_queries = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1).float()  # (B*Q, C)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()  # (B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device, torch.int64)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, torch.float32)
        cost = (self.cost_class * self.classification_cost(logits, tgt_labels)
                + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                                                       box_cxcywh_to_xyxy(tgt_boxes)))
        # An explicit size: view(B, Q, -1) is ambiguous when the batch has no targets at all.
        return cost.view(batch_size, num_queries, len(tgt_labels))

    def replace_nonfinite(self, cost: Tensor) -> Tensor:
        """Replace NaN/inf costs by a finite value larger than every finite one; count and warn."""
        finite = torch.isfinite(cost)
        num_bad = int((~finite).sum())
        if num_bad == 0:
            return cost
        self.num_nonfinite_costs += num_bad
        largest = float(cost[finite].abs().max()) if bool(finite.any()) else 0.0
        warnings.warn(f"HungarianMatcher: {num_bad} non-finite matching costs (NaN/inf predictions?) "
                      "replaced by a large finite cost; the model may be diverging",
                      RuntimeWarning, stacklevel=3)
        return torch.where(finite, cost, torch.full_like(cost, largest + NONFINITE_COST_MARGIN))

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: {"pred_logits": (B, Q, C) focal or (B, Q, C+1) softmax (no-object last),
                "pred_boxes": (B, Q, 4) cx, cy, w, h normalised}; any dtype (cast to fp32).
            targets: B dicts {"labels": int64 (n_b,), "boxes": (n_b, 4) cx, cy, w, h normalised}.

        Returns:
            B pairs (pred_idx, target_idx), int64 CPU tensors of length min(Q, n_b); pred_idx is
            sorted ascending.
        """
        num_labels = outputs["pred_logits"].shape[-1] - (0 if self.focal else 1)
        check_detection_inputs(outputs, targets, num_labels)
        cost = self.replace_nonfinite(self.cost_matrix(outputs, targets).cpu())
        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for image, image_cost in enumerate(cost.split(sizes, dim=-1)):
            pred_idx, target_idx = linear_sum_assignment(image_cost[image].numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64),
                            torch.as_tensor(target_idx, dtype=torch.int64)))
        return indices
