"""Hungarian matching between a detector's queries and the ground-truth boxes of each image.

The cost of pairing query ``q`` with target ``t`` is a weighted sum of a classification cost, the L1
distance of the boxes and the negative generalized IoU, as in DETR. With ``focal=True`` the
classification cost is Deformable-DETR's focal cost on sigmoid probabilities; otherwise DETR's
``-softmax probability`` of the target class. Costs are computed in one batched pass for every
image (and, through ``match_layers``, every decoder layer) against its own targets only, padded
to the most targets of the batch, copied to the host once, and each image is then solved with
``scipy.optimize.linear_sum_assignment`` (assignment.py). The padded pass does B times less work
than pairing every query with every target of the batch and splitting; each solved matrix holds
the same values as that pairing's block (bit for bit, but for the last bit of a few sigmoids on
CPU, which depend on the tensor's layout as they already did on the thread count).

With ``cost_mask`` / ``cost_dice`` > 0 and "pred_masks" in the outputs (segmentation heads), each
image's cost also gets Mask2Former's mask costs: sigmoid BCE and dice between every query's and
every target's mask at ``mask_points`` points drawn uniformly in the image (memory (Q + T) x
points per image, never a full-resolution (Q, T, H, W) tensor).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from pipeline.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from pipeline.losses.assignment import indices_to, solve_padded
from pipeline.losses.masks import point_sample

# Added to the magnitude of the largest finite cost to replace NaN/inf entries: such a pair is
# never preferred to a finite one, and the solver never sees a non-finite value (it raises then).
NONFINITE_COST_MARGIN = 1e6

# Keeps the log finite when a probability reaches exactly 0 or 1 (the reference code's epsilon).
FOCAL_COST_EPS = 1e-8


def check_focal(alpha: float, gamma: float, owner: str) -> None:
    """Raise ValueError unless alpha lies in [0, 1] and gamma >= 0 (focal cost and loss)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{owner}: focal_alpha must lie in [0, 1], got {alpha}")
    if gamma < 0:
        raise ValueError(f"{owner}: focal_gamma must be >= 0, got {gamma}")


@dataclass
class MatcherConfig:
    """Weights of the matching cost; defaults are Deformable-DETR's (DETR uses cost_class=1).

    Whether the class cost is focal follows the model (``DetectorConfig.focal``), and its
    alpha / gamma are the criterion's (``CriterionConfig.focal_alpha`` / ``focal_gamma``), so
    matching and loss never disagree; ``HungarianMatcher.from_config`` takes them from there.
    """

    cost_class: float = 2.0  # weight of the classification cost
    cost_bbox: float = 5.0  # weight of the L1 distance between cx, cy, w, h boxes
    cost_giou: float = 2.0  # weight of the negative generalized IoU
    cost_mask: float = 0.0  # weight of the sigmoid BCE between sampled mask points (Mask2Former: 5); 0 = off
    cost_dice: float = 0.0  # weight of the dice cost between sampled mask points (Mask2Former: 5); 0 = off
    mask_points: int = 12544  # points drawn per image for the mask costs (Mask2Former: 112 * 112)

    def __post_init__(self) -> None:
        if self.mask_points < 1:
            raise ValueError(f"MatcherConfig.mask_points must be >= 1, got {self.mask_points}")
        for name in ("cost_class", "cost_bbox", "cost_giou", "cost_mask", "cost_dice"):
            if getattr(self, name) < 0:
                raise ValueError(f"MatcherConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("MatcherConfig: cost_class, cost_bbox and cost_giou are all 0; "
                             "set at least one of them > 0")


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
                 focal: bool = True, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 cost_mask: float = 0.0, cost_dice: float = 0.0, mask_points: int = 12544) -> None:
        super().__init__()
        MatcherConfig(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou,
                      cost_mask=cost_mask, cost_dice=cost_dice, mask_points=mask_points)  # validates
        check_focal(focal_alpha, focal_gamma, "HungarianMatcher")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.cost_mask, self.cost_dice, self.mask_points = cost_mask, cost_dice, mask_points
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma
        # How many cost entries were NaN/inf since construction (a symptom of a diverging model).
        self.num_nonfinite_costs = 0

    @classmethod
    def from_config(cls, cfg: MatcherConfig, focal: bool, focal_alpha: float = 0.25,
                    focal_gamma: float = 2.0) -> HungarianMatcher:
        """The matcher of ``cfg`` for a focal (sigmoid) or softmax head; see ``MatcherConfig``."""
        return cls(**dataclasses.asdict(cfg), focal=focal, focal_alpha=focal_alpha,
                   focal_gamma=focal_gamma)

    def classification_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """(P, C) or (P, C+1) fp32 logits, (T,) labels -> (P, T) classification cost."""
        if not self.focal:
            return -logits.softmax(-1)[:, labels]
        return self.focal_cost(logits[:, labels])

    def focal_cost(self, target_logits: Tensor) -> Tensor:
        """Focal classification cost of the logits of the target classes, any shape.

        Element-wise, so selecting the target classes first gives the reference's values on a
        (P, T) instead of a (P, C) tensor."""
        prob = target_logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * prob**gamma * -(1 - prob + FOCAL_COST_EPS).log()
        pos_cost = alpha * (1 - prob) ** gamma * -(prob + FOCAL_COST_EPS).log()
        return pos_cost - neg_cost

    @torch.no_grad()
    def layers_cost_pieces(self, layers: list[dict], targets: list[dict]) -> dict[str, Tensor]:
        """``cost_pieces`` of L same-shape layers at once, each (L*B, Q, T_max): row l*B + b is
        layer l, image b against its own targets, padded to the most targets of the batch."""
        device = layers[0]["pred_logits"].device
        num_queries = layers[0]["pred_logits"].shape[1]
        labels = pad_sequence([t["labels"].reshape(-1) for t in targets], batch_first=True)
        labels = labels.to(device, torch.int64)  # (B, T_max), padding 0 (a valid class)
        tgt_boxes = pad_sequence([t["boxes"].reshape(-1, 4) for t in targets], batch_first=True)
        tgt_boxes = tgt_boxes.to(device, torch.float32).repeat(len(layers), 1, 1)  # (L*B, T_max, 4)
        select = labels[:, None, :].expand(-1, num_queries, -1)  # (B, Q, T_max)
        scores = []  # the target classes' logits (focal) or probabilities (softmax), per layer
        for layer in layers:
            logits = layer["pred_logits"].float()
            scores.append((logits if self.focal else logits.softmax(-1)).gather(2, select))
        scores = torch.cat(scores)
        boxes = torch.cat([layer["pred_boxes"].float() for layer in layers])  # (L*B, Q, 4)
        return {
            "class": self.cost_class * (self.focal_cost(scores) if self.focal else -scores),
            "bbox": self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1),
            "giou": -self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                                                          box_cxcywh_to_xyxy(tgt_boxes)),
        }

    @torch.no_grad()
    def cost_pieces(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """The weighted terms of ``cost_matrix``, each (B, Q, T_max) fp32: "class"
        (cost_class x classification cost), "bbox" (cost_bbox x L1), "giou" (-cost_giou x GIoU);
        their sum is the box part of the matching cost (the inspector shows them apart). Image b's
        columns past len(targets[b]) are padding (finite, meaningless)."""
        return self.layers_cost_pieces([outputs], targets)

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> Tensor:
        """(B, Q, T_max) fp32 cost of each image's queries against its own targets (padded)."""
        pieces = self.cost_pieces(outputs, targets)
        return pieces["class"] + pieces["bbox"] + pieces["giou"]

    @torch.no_grad()
    def mask_cost(self, pred_masks: Tensor, target_masks: Tensor, canvas_size: tuple[int, int]) -> Tensor:
        """One image: (Q, h, w) mask logits over the padded canvas, (T, h_i, w_i) target masks at
        the unpadded size -> (Q, T) fp32 ``cost_mask * BCE + cost_dice * dice`` on shared points."""
        num_queries, num_targets = pred_masks.shape[0], target_masks.shape[0]
        if num_targets == 0:
            return pred_masks.new_zeros(num_queries, 0, dtype=torch.float32)
        points = torch.rand(1, self.mask_points, 2, device=pred_masks.device)  # x, y in the image
        height, width = target_masks.shape[-2:]
        to_canvas = torch.tensor([width / canvas_size[1], height / canvas_size[0]], device=points.device)
        pred = point_sample(pred_masks[None].float(), points * to_canvas)[0]  # (Q, P)
        target = point_sample(target_masks[None].to(pred.device, torch.float32), points)[0]  # (T, P)
        positive = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
        negative = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
        bce = (positive @ target.T + negative @ (1 - target).T) / self.mask_points
        prob = pred.sigmoid()
        dice = 1 - (2 * prob @ target.T + 1) / (prob.sum(-1)[:, None] + target.sum(-1)[None] + 1)
        return self.cost_mask * bce + self.cost_dice * dice

    def uses_masks(self, outputs: dict, targets: list[dict]) -> bool:
        """Whether mask costs apply: weights > 0 and "pred_masks" present (two-stage encoder
        proposals have none). Raises ValueError when the targets lack "masks"."""
        if not (self.cost_mask or self.cost_dice) or "pred_masks" not in outputs:
            return False
        if any("masks" not in t for t in targets):
            raise ValueError("HungarianMatcher: cost_mask / cost_dice need 'masks' (n, H, W) in every target; "
                             "load the data with masks (DetectionDataConfig.with_masks) or set them to 0")
        return True

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
        """Match each image's queries to its targets: ``match_layers([outputs], targets)[0]``.

        Args:
            outputs: {"pred_logits": (B, Q, C) focal or (B, Q, C+1) softmax (no-object last),
                "pred_boxes": (B, Q, 4) cx, cy, w, h normalised}; any dtype (cast to fp32).
            targets: B dicts {"labels": int64 (n_b,), "boxes": (n_b, 4) cx, cy, w, h normalised}.

        Returns:
            B pairs (pred_idx, target_idx), int64 tensors on the predictions' device (moved there
            in one copy for the whole call) of length min(Q, n_b); pred_idx is sorted ascending.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """``forward`` of each layer (e.g. the decoder's last and auxiliary layers) against the
        same targets, with one batched cost computation and one device->host copy for all.

        The layers must have the same shapes. Mask costs (layers with "pred_masks") are drawn
        layer by layer, image by image, in the order of separate ``forward`` calls.
        """
        first = layers[0]
        check_detection_inputs(first, targets, first["pred_logits"].shape[-1] - (0 if self.focal else 1))
        for i, layer in enumerate(layers[1:], 1):
            if any(layer[k].shape != first[k].shape for k in ("pred_logits", "pred_boxes")):
                raise ValueError(f"match_layers: layer {i} has pred_logits {tuple(layer['pred_logits'].shape)}, "
                                 f"layer 0 {tuple(first['pred_logits'].shape)}; match layers of another "
                                 "shape in a separate call")
        with_masks = [self.uses_masks(layer, targets) for layer in layers]
        sizes = [len(t["boxes"]) for t in targets]
        pieces = self.layers_cost_pieces(layers, targets)
        cost = (pieces["class"] + pieces["bbox"] + pieces["giou"]).cpu()  # the one device->host copy
        padding = torch.arange(cost.shape[-1]) >= torch.tensor(sizes).repeat(len(layers))[:, None]
        cost = self.replace_nonfinite(cost.masked_fill_(padding[:, None, :], 0.0))
        if any(with_masks):
            self.add_mask_costs(cost, layers, with_masks, targets)
        solved = indices_to(solve_padded(cost, sizes * len(layers)), first["pred_logits"].device)
        return [solved[i * len(targets):(i + 1) * len(targets)] for i in range(len(layers))]

    def add_mask_costs(self, cost: Tensor, layers: list[dict], with_masks: list[bool], targets: list[dict]) -> None:
        """Add each masked layer's per-image mask costs to the host ``cost`` (L*B, Q, T_max)."""
        # The canvas the masks cover, by DETR's rule: images padded to the largest of the batch.
        canvas = tuple(max(t["masks"].shape[-2 + i] for t in targets) for i in range(2))
        for index, layer in enumerate(layers):
            if not with_masks[index]:
                continue
            for image, target in enumerate(targets):
                row, size = index * len(targets) + image, len(target["boxes"])
                masks_cost = self.mask_cost(layer["pred_masks"][image], target["masks"], canvas)
                cost[row, :, :size] = self.replace_nonfinite(cost[row, :, :size] + masks_cost.cpu())
