"""DETR's set criterion: Hungarian matching, then classification and box losses per decoder layer.

Values equal those of the official code on the same inputs:
- focal (Deformable-DETR): sigmoid focal loss over all queries and classes against one-hot
  targets (unmatched queries are all-zero rows), ``mean over queries, summed, / num_boxes``, times
  ``num_queries``;
- softmax (DETR): cross-entropy over C+1 classes, weighted mean with ``eos_coef`` on no-object;
- L1 and ``1 - GIoU`` of the matched boxes, summed and divided by ``num_boxes``, the number of
  target boxes averaged over ranks (at least 1).
Keys keep DETR's names: ``loss_ce``, ``loss_bbox``, ``loss_giou``, suffixed ``_{i}`` for
``outputs["aux_outputs"][i]`` and ``_enc`` for two-stage proposals (matched class-agnostically).
``class_error`` (percent top-1 error on the matched queries of the last layer) is a detached metric.
With a ``mask_loss`` config, layers whose outputs hold "pred_masks" (B, Q, h, w) also get
``loss_mask`` and ``loss_dice`` (see masks.py) of the box-matched queries, and a segmenter's
"enc_selected" (the encoder's top-k tokens with their masks, Mask DINO's unified query selection)
gets ``loss_mask_enc`` and ``loss_dice_enc``, matched class-agnostically as the proposals.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from pipeline.losses.focal import sigmoid_focal_loss
from pipeline.losses.masks import MaskLossConfig, mask_losses, pad_masks
from pipeline.losses.matcher import HungarianMatcher, MatcherConfig, check_focal

# "loss_ce_3" -> "loss_ce", "loss_giou_enc" -> "loss_giou", "loss_bbox_dn_2" -> "loss_bbox"
# (DINO's denoising losses): auxiliary, encoder and denoising keys share the base weight.
_SUFFIX = re.compile(r"(_dn)?(_(\d+|enc))?$")


@dataclass
class LossWeights:
    """Weights of the summed loss, applied to every auxiliary and encoder copy of each loss."""

    ce: float = 2.0  # classification loss (Deformable-DETR 2, DETR 1)
    bbox: float = 5.0  # L1 box loss
    giou: float = 2.0  # generalized IoU loss
    mask: float = 1.0  # per-pixel mask loss (segmentation heads only; Mask2Former uses 5)
    dice: float = 1.0  # dice mask loss (segmentation heads only; Mask2Former uses 5)
    extra: dict[str, float] = field(default_factory=dict)  # weights of other losses by key, e.g. {"loss_dice": 5}

    def __post_init__(self) -> None:
        named = [("ce", self.ce), ("bbox", self.bbox), ("giou", self.giou), ("mask", self.mask), ("dice", self.dice)]
        for name, value in [*named, *self.extra.items()]:
            if value < 0:
                raise ValueError(f"LossWeights.{name} must be >= 0, got {value}")

    @classmethod
    def deformable_detr(cls) -> LossWeights:
        """Deformable-DETR's weights: ce 2, bbox 5, giou 2."""
        return cls(ce=2.0, bbox=5.0, giou=2.0)

    @classmethod
    def detr(cls) -> LossWeights:
        """DETR's weights: ce 1, bbox 5, giou 2."""
        return cls(ce=1.0, bbox=5.0, giou=2.0)

    def as_dict(self) -> dict[str, float]:
        """Weights by base loss key: {"loss_ce": ..., "loss_giou": ..., "loss_dice": ..., **extra}."""
        return {"loss_ce": self.ce, "loss_bbox": self.bbox, "loss_giou": self.giou,
                "loss_mask": self.mask, "loss_dice": self.dice, **self.extra}


@dataclass
class CriterionConfig:
    """Matching and loss settings of a DETR-family detector. Whether the class loss is focal
    follows the model (``DetectorConfig.focal``): see ``SetCriterion.from_config``."""

    matcher: MatcherConfig = field(default_factory=MatcherConfig)  # matching cost weights
    weights: LossWeights = field(default_factory=LossWeights)  # weights of the summed loss
    focal_alpha: float = 0.25  # focal loss and matching cost alpha (focal heads only)
    focal_gamma: float = 2.0  # focal loss and matching cost gamma (focal heads only)
    eos_coef: float = 0.1  # weight of the no-object class in the softmax loss (DETR heads only)
    class_loss: str = "focal"  # focal heads: "focal" | "varifocal" (matched box IoU as soft target; losses/denoising.py)
    masks: MaskLossConfig | None = None  # mask losses for segmentation heads; None = boxes only

    def __post_init__(self) -> None:
        if isinstance(self.masks, dict):
            self.masks = MaskLossConfig(**self.masks)
        if isinstance(self.matcher, dict):
            self.matcher = MatcherConfig(**self.matcher)
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        check_focal(self.focal_alpha, self.focal_gamma, "CriterionConfig")
        if self.class_loss not in ("focal", "varifocal"):
            raise ValueError(f"criterion.class_loss must be 'focal' or 'varifocal', got {self.class_loss!r}")
        if not 0.0 <= self.eos_coef <= 1.0:
            raise ValueError(f"CriterionConfig.eos_coef must lie in [0, 1], got {self.eos_coef}")


def average_num_boxes(targets: list[dict], device: torch.device) -> Tensor:
    """Target boxes per rank, averaged over ranks when torch.distributed is initialised, >= 1.

    Every rank divides by the same number, so the summed gradient is that of the global batch.
    """
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return (num_boxes / world_size).clamp(min=1.0)[0]


def batch_permutation_index(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx) of every matched query, to index (B, Q, ...) tensors."""
    batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)])
    return batch_idx, torch.cat([pred for pred, _ in indices])


class SetCriterion(nn.Module):
    """Unweighted DETR losses of every decoder layer; see the module docstring for definitions."""

    handles_denoising = False  # DINO's denoising outputs need DinoCriterion (losses/denoising.py)

    def __init__(self, num_classes: int, matcher: HungarianMatcher, focal: bool = True,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, eos_coef: float = 0.1,
                 mask_loss: MaskLossConfig | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1, got {num_classes}")
        if matcher.focal != focal:
            raise ValueError(f"SetCriterion(focal={focal}) with a HungarianMatcher(focal="
                             f"{matcher.focal}): both must use the same classification head type")
        CriterionConfig(focal_alpha=focal_alpha, focal_gamma=focal_gamma, eos_coef=eos_coef)
        self.num_classes, self.matcher, self.focal = num_classes, matcher, focal
        self.focal_alpha, self.focal_gamma, self.eos_coef = focal_alpha, focal_gamma, eos_coef
        self.mask_loss = mask_loss
        # The softmax loss down-weights the (many) no-object queries, as DETR does.
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @classmethod
    def from_config(cls, cfg: CriterionConfig, num_classes: int, focal: bool) -> SetCriterion:
        """The criterion (and its matcher) of ``cfg`` for a head with ``num_classes`` object
        classes (no-object excluded), focal (sigmoid) or softmax as ``DetectorConfig.focal``."""
        matcher = HungarianMatcher.from_config(cfg.matcher, focal, cfg.focal_alpha, cfg.focal_gamma)
        return cls(num_classes, matcher, focal=focal, focal_alpha=cfg.focal_alpha,
                   focal_gamma=cfg.focal_gamma, eos_coef=cfg.eos_coef, mask_loss=cfg.masks)

    def expected_logit_dim(self) -> int:
        return self.num_classes if self.focal else self.num_classes + 1

    def matched_classes(self, logits: Tensor, targets: list[dict], indices: list) -> Tensor:
        """(B, Q) int64 class per query: the matched target's label, else num_classes (no object)."""
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        labels = [t["labels"][tgt].to(logits.device) for t, (_, tgt) in zip(targets, indices)]
        classes[batch_permutation_index(indices)] = torch.cat(labels).to(torch.int64)
        return classes

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_boxes: Tensor) -> Tensor:
        """Classification loss of (B, Q, C) focal or (B, Q, C+1) softmax logits, fp32."""
        logits = outputs["pred_logits"].float()
        classes = self.matched_classes(logits, targets, indices)
        if not self.focal:
            return F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight.to(logits.device))
        # One-hot over C+1 then drop no-object: unmatched queries get an all-zero target row.
        onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma)
        return loss * logits.shape[1]

    @torch.no_grad()
    def class_error(self, outputs: dict, targets: list[dict], indices: list) -> Tensor:
        """Percent top-1 error of the matched queries (0 when nothing is matched); a metric."""
        logits = outputs["pred_logits"].float()
        matched = logits[batch_permutation_index(indices)]
        if len(matched) == 0:
            return torch.zeros((), device=logits.device)
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(logits.device)
        return 100.0 * (matched.argmax(-1) != labels).float().mean()

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: list,
                   num_boxes: Tensor) -> dict[str, Tensor]:
        """L1 and 1 - GIoU of the matched (cx, cy, w, h) boxes, each summed / num_boxes, fp32.

        With no matched box both are 0 but still attached to the graph (zero gradients).
        """
        pred = outputs["pred_boxes"][batch_permutation_index(indices)].float()  # (M, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred.device).float()
        loss_bbox = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_masks(self, outputs: dict, targets: list[dict], indices: list, num_boxes: Tensor,
                   canvas_size: tuple[int, int] | None) -> dict[str, Tensor]:
        """loss_mask and loss_dice of the matched queries' (B, Q, h, w) "pred_masks"."""
        if self.mask_loss is None:
            raise ValueError("SetCriterion: outputs hold 'pred_masks' but no mask loss is configured; "
                             "set CriterionConfig.masks (or mask_loss=MaskLossConfig())")
        if any("masks" not in t for t in targets):
            raise ValueError("SetCriterion: a segmentation head needs 'masks' (n, H, W) in every target")
        masks = [t["masks"] for t in targets]
        if canvas_size is None:  # DETR's rule: images were padded to the largest of the batch
            canvas_size = (max(m.shape[-2] for m in masks), max(m.shape[-1] for m in masks))
        device = outputs["pred_masks"].device
        matched = [m[j.to(m.device)] for m, (_, j) in zip(pad_masks(masks, canvas_size), indices)]
        pred = outputs["pred_masks"][batch_permutation_index(indices)]  # (M, h, w)
        return mask_losses(pred, torch.cat(matched).to(device), num_boxes, self.mask_loss)

    def check_logit_dim(self, outputs: dict, suffix: str) -> None:
        logit_dim = outputs["pred_logits"].shape[-1]
        if logit_dim != self.expected_logit_dim():
            head = "focal: C" if self.focal else "softmax: C+1 with no-object last"
            raise ValueError(f"SetCriterion: pred_logits{suffix} has {logit_dim} classes, expected "
                             f"{self.expected_logit_dim()} ({head}, C={self.num_classes}); the "
                             "model's num_classes or head type differs from the criterion's")

    def match_decoder_layers(self, layers: list[dict], targets: list[dict]) -> list:
        """Each decoder layer's matching (last layer first, then the auxiliary ones) from one
        batched matcher call: one cost computation and one device->host copy for all. None per
        layer where each is matched in ``layer_losses`` instead: segmentation layers (their mask
        costs and mask losses draw random points in turn) or layers of different shapes."""
        shapes = {(layer["pred_logits"].shape, layer["pred_boxes"].shape) for layer in layers}
        if len(layers) < 2 or len(shapes) > 1 or any("pred_masks" in layer for layer in layers):
            return [None] * len(layers)
        for i, layer in enumerate(layers):
            self.check_logit_dim(layer, f"_{i - 1}" if i else "")
        return self.matcher.match_layers(layers, targets)

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: Tensor,
                     suffix: str = "", canvas_size: tuple[int, int] | None = None,
                     indices: list | None = None) -> tuple[dict[str, Tensor], list]:
        """Match one layer's predictions (unless ``indices`` are given), then its losses with
        ``suffix`` added to each key."""
        self.check_logit_dim(outputs, suffix)
        if indices is None:
            indices = self.matcher(outputs, targets)
        losses = {"loss_ce": self.loss_labels(outputs, targets, indices, num_boxes),
                  **self.loss_boxes(outputs, targets, indices, num_boxes)}
        if "pred_masks" in outputs:
            losses.update(self.loss_masks(outputs, targets, indices, num_boxes, canvas_size))
        return {key + suffix: value for key, value in losses.items()}, indices

    def forward(self, outputs: dict, targets: list[dict],
                canvas_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Unweighted losses of the last layer, each auxiliary layer and the encoder proposals.

        Args:
            outputs: {"pred_logits": (B, Q, C) or (B, Q, C+1), "pred_boxes": (B, Q, 4), optional
                "aux_outputs": list of dicts with the same keys, optional "enc_outputs": dict}.
            targets: B dicts {"labels": int64 (n,), "boxes": (n, 4) cx, cy, w, h normalised,
                "masks": bool (n, h_i, w_i) when the outputs hold "pred_masks"}.
            canvas_size: (H, W) of the padded images ("images".shape[-2:]) that "pred_masks"
                cover; None: the largest target mask size (exact when no size_divisibility).

        Returns:
            fp32 scalars "loss_ce", "loss_bbox", "loss_giou" (+ "loss_mask", "loss_dice" for
            layers with "pred_masks"), the same keys + f"_{i}" per aux layer and + "_enc" for
            enc_outputs (+ "loss_mask_enc", "loss_dice_enc" with "enc_selected"), and the
            detached metric "class_error".
        """
        if "dn_meta" in outputs and not self.handles_denoising:
            raise ValueError("SetCriterion: the outputs hold DINO's denoising queries, which it would leave "
                             "untrained; build the criterion with pipeline.losses.denoising.build_dino_criterion")
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        matched = self.match_decoder_layers([outputs, *(outputs.get("aux_outputs") or [])], targets)
        losses, indices = self.layer_losses(outputs, targets, num_boxes, canvas_size=canvas_size, indices=matched[0])
        losses["class_error"] = self.class_error(outputs, targets, indices)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self.layer_losses(aux, targets, num_boxes, f"_{i}", canvas_size, matched[i + 1])[0])
        if outputs.get("enc_outputs") is not None:
            # Two-stage proposals are class-agnostic: every target counts as class 0.
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = {k: v for k, v in outputs["enc_outputs"].items() if k != "pred_masks"}
            losses.update(self.layer_losses(enc, agnostic, num_boxes, "_enc")[0])
            if outputs.get("enc_selected") is not None:
                losses.update(self.selected_mask_losses(outputs["enc_selected"], agnostic, num_boxes, canvas_size))
        return losses

    def selected_mask_losses(self, selected: dict, agnostic: list[dict], num_boxes: Tensor,
                             canvas_size: tuple[int, int] | None) -> dict[str, Tensor]:
        """``loss_mask_enc`` / ``loss_dice_enc`` of the encoder's top-k tokens' masks: matched on
        their own (class-agnostic, as the proposals; mask costs too when configured), since the
        proposals' match over every token may pick tokens outside the top-k."""
        indices = self.matcher(selected, agnostic)
        masks = self.loss_masks(selected, agnostic, indices, num_boxes, canvas_size)
        return {key + "_enc": value for key, value in masks.items()}

    @staticmethod
    def weighted_total(losses: Mapping[str, Tensor], weights: LossWeights | Mapping[str, float]) -> Tensor:
        """Sum of every ``loss_*`` entry times the weight of its base key (suffix removed).

        Metrics (keys not starting with ``loss_``, e.g. ``class_error``) are left out. A loss
        without a weight raises ValueError rather than silently not being trained.
        """
        table = weights.as_dict() if isinstance(weights, LossWeights) else dict(weights)
        terms = []
        for key, value in losses.items():
            if not key.startswith("loss_"):
                continue
            base = _SUFFIX.sub("", key)
            if base not in table:
                raise ValueError(f"no weight for loss '{key}' (base key '{base}'); weights cover "
                                 f"{sorted(table)}: add it to LossWeights.extra")
            terms.append(table[base] * value)
        if not terms:
            raise ValueError(f"no 'loss_*' key among {sorted(losses)}")
        return torch.stack(terms).sum()


    def loss_and_metrics(self, outputs: dict, targets: list[dict], weights: LossWeights | Mapping[str, float],
                         canvas_size: tuple[int, int] | None = None) -> tuple[Tensor, dict[str, float]]:
        """(weighted total loss, every unweighted loss and class_error as floats), the pair a
        training step returns; the metric keys are the same on every call for one model."""
        losses = self(outputs, targets, canvas_size)
        total = self.weighted_total(losses, weights)
        values = torch.stack([value.detach().float() for value in losses.values()]).tolist()  # one sync
        return total, dict(zip(losses, values))
