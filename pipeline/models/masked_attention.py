"""Masked attention for the deformable decoder of the segmenter (Mask2Former / Mask DINO).

Before every decoder layer i, the queries entering it (the initial queries for i = 0, else
layer i-1's output) predict masks with the segmenter's own head: mask logits (B, Q, h, w) =
mask_embed(tgt) . per-pixel embeddings (the pixel decoder's output, stride 4 or 8). Layer i's
cross-attention is then restricted to those masks. What "restricted" means here, and why:

- **Masked sampling** (``mode="masked"``, Mask2Former's idea on deformable attention).
  Mask2Former's masked attention sets the attention logits of pixels outside a query's mask to
  -inf in a dense cross-attention, round-robin over one feature level per layer. A deformable
  decoder has no dense attention: each query samples P points per head and level, on every level
  in every layer, with weights softmaxed over the L x P points of a head. So the mask applies to
  the sampled points: the logits are resized to each level (bilinear, as Mask2Former resizes to
  its attention level), thresholded at sigmoid >= 0.5 and cut to the unpadded image; a point whose
  pixel (the level's pixel containing its location) lies outside the query's mask at that level
  gets weight 0, and the weights of the head are renormalised to sum to 1. Round-robin over the
  levels is not needed (every layer already reads every level at O(Q x H x L x P) cost), so it is
  not done. Fallbacks: a query whose mask is empty at a level attends to the whole image at that
  level (Mask2Former's empty-mask rule); a head whose points all fall outside keeps its unmasked
  weights (renormalising zero would divide by zero; Mask2Former has the same escape for rows that
  would be all -inf). The boolean masks carry no gradient, as Mask2Former's detached mask.
- **Mask-guided boxes** (``mode="masked+boxes"``, Mask DINO's mask-enhanced anchor boxes): the
  tight box of each query's thresholded mask (at the mask resolution, normalised to the unpadded
  image) replaces its reference box for layer i, so the deformable sampling grid is laid over the
  object the mask found; the box head then predicts its refinement relative to that box. Mask
  DINO does this once, for the boxes selected from the encoder; here it is done before every
  layer, box refinement staying as the fallback for queries with empty masks. Needs box
  references (``two_stage``). Masked sampling is applied as well.
- **Unified query selection** (Mask DINO Sec. 3.3, ``unified_query_selection``): the encoder's
  top-k selected tokens (two-stage) also predict masks, their transformed memory . per-pixel
  embeddings with the same head. Those masks, not the initial queries' own, guide layer 0 of the
  matching queries (repeated per Group-DETR group), so with ``masked+boxes`` layer 0's reference
  boxes are their tight boxes (Mask DINO's mask-enhanced anchor box initialisation). The segmenter
  returns them in training as "enc_selected" and the criterion gives them the mask losses
  (``loss_mask_enc``, ``loss_dice_enc``), which makes the selection mask-aware. Without it the
  masks guiding layer 0 come from the initial queries with no loss of their own (every later
  guiding mask is a supervised auxiliary prediction).
- **Denoising queries** (DINO segmenter, training): they are guided like the matching queries, by
  their own masks, with one exception: at layer 0 they keep their noised ground-truth boxes (the
  box they are to denoise), and their layer-0 masks are predicted from their label embedding. The
  decoder's self-attention mask still keeps the matching queries from seeing them; masked
  attention is per query and mixes nothing across queries.

``MaskGuidance`` is the transformer's ``selection_hook`` and the decoder's ``layer_hook``; it
keeps the mask logits it computed, so that the segmenter reuses them as the per-layer
"pred_masks" instead of computing them twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.boxes import masks_to_boxes
from pipeline.models.position import mask_to_feature

MASK_ATTENTION_MODES = ("none", "masked", "masked+boxes")
MASK_THRESHOLD = 0.5  # sigmoid probability above which a pixel is inside a query's mask (both papers)


def level_attention_masks(mask_logits: Tensor, level_padding: list[Tensor],
                          threshold: float = MASK_THRESHOLD) -> list[Tensor]:
    """(B, Q, h, w) mask logits, per-level (B, h_l, w_l) padding masks (True on padding) ->
    per level (B, Q, h_l * w_l) bool, True where the query may attend. A query with no pixel at a
    level may attend to the whole unpadded image there."""
    allowed = []
    for padding in level_padding:
        probs = F.interpolate(mask_logits.detach().float(), size=tuple(padding.shape[-2:]), mode="bilinear",
                              align_corners=False).sigmoid()
        valid = ~padding[:, None]  # (B, 1, h_l, w_l)
        inside = (probs >= threshold) & valid
        empty = ~inside.flatten(2).any(-1)  # (B, Q)
        inside = torch.where(empty[..., None, None], valid, inside)
        allowed.append(inside.flatten(2))
    return allowed


def masked_sampling_weights(weights: Tensor, locations: Tensor, allowed: list[Tensor],
                            shapes: list[tuple[int, int]]) -> Tensor:
    """Deformable attention weights restricted to the queries' masks.

    weights (B, Q, H, L, P) summing to 1 over (L, P); locations (B, Q, H, L, P, 2) normalised
    (x, y) of the padded level maps; allowed: per level (B, Q, h_l * w_l) bool; shapes: (h_l, w_l)
    -> (B, Q, H, L, P): 0 at points outside the mask (or outside the map), renormalised over
    (L, P); a head with no point inside keeps its weights.
    """
    keep = torch.zeros(weights.shape, dtype=torch.bool, device=weights.device)
    for level, (h, w) in enumerate(shapes):
        where = locations[:, :, :, level]  # (B, Q, H, P, 2)
        col = torch.floor(where[..., 0] * w).long()
        row = torch.floor(where[..., 1] * h).long()
        on_map = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).flatten(2)  # (B, Q, H * P)
        inside = allowed[level].gather(2, index).view(on_map.shape)
        keep[:, :, :, level] = inside & on_map
    masked = weights * keep
    total = masked.sum((-2, -1), keepdim=True)
    return torch.where(total > 0, masked / total.clamp(min=torch.finfo(total.dtype).tiny), weights)


def boxes_from_masks(mask_logits: Tensor, padding: Tensor,
                     threshold: float = MASK_THRESHOLD) -> tuple[Tensor, Tensor]:
    """(B, Q, h, w) mask logits over the padded canvas, (B, h, w) padding at that size ->
    (B, Q, 4) cx, cy, w, h boxes normalised to the unpadded image, (B, Q) bool: mask not empty."""
    batch, queries, h, w = mask_logits.shape
    masks = (mask_logits.detach().sigmoid() >= threshold) & ~padding[:, None]
    xyxy = masks_to_boxes(masks.flatten(0, 1)).view(batch, queries, 4)
    valid_w = (~padding[:, 0, :]).sum(-1).clamp(min=1).to(xyxy.dtype)
    valid_h = (~padding[:, :, 0]).sum(-1).clamp(min=1).to(xyxy.dtype)
    xyxy = xyxy / torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None]
    boxes = torch.cat([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]], -1)
    return boxes.clamp(0.0, 1.0), masks.flatten(2).any(-1)


class MaskGuidance:
    """One forward pass's mask guidance (see the module docstring): the transformer's
    ``selection_hook`` (``select``) and, unless ``mode`` is "none", the decoder's ``layer_hook``.

    ``pixels_of(memory (B, S, C)) -> (B, D, h, w)`` runs the pixel decoder once, on the first
    call; ``level_padding`` holds the (B, h_l, w_l) padding mask of every level, ``padding_mask``
    (B, H, W) that of the images. ``mask_logits[i]`` (B, Q, h, w) is the prediction that guided
    layer i (from layer i-1's output for i >= 1, with gradient); ``selected_logits`` (B, K, h, w)
    those of the encoder's top-k tokens (``unified`` only, with gradient).
    """

    def __init__(self, mode: str, mask_embed: nn.Module, pixels_of: Callable[[Tensor], Tensor],
                 level_padding: list[Tensor], padding_mask: Tensor, unified: bool = False):
        if mode not in MASK_ATTENTION_MODES:
            raise ValueError(f"MaskGuidance: mode must be one of {MASK_ATTENTION_MODES}, got {mode!r}")
        self.mode, self.mask_embed, self.pixels_of, self.unified = mode, mask_embed, pixels_of, unified
        self.level_padding, self.padding_mask = level_padding, padding_mask
        self.shapes = [tuple(p.shape[-2:]) for p in level_padding]
        self.pixels: Tensor | None = None
        self.mask_logits: list[Tensor] = []
        self.num_matching: int | None = None  # matching queries (after the denoising ones), from select
        self.selected_logits: Tensor | None = None

    def pixels_for(self, memory: Tensor) -> Tensor:
        """The per-pixel embeddings (B, D, h, w) of ``memory``, computed once per forward."""
        if self.pixels is None:
            self.pixels = self.pixels_of(memory)
        return self.pixels

    def predict_masks(self, queries: Tensor) -> Tensor:
        """(B, Q, C) query states -> (B, Q, h, w) mask logits."""
        return torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), self.pixels)

    def select(self, selected: Tensor, reference: Tensor, memory: Tensor) -> None:
        """``selection_hook``: selected (B, K, C) top-k tokens, reference (B, Q', 4) of the
        matching queries (Q' = K x query groups): how many there are, and with ``unified`` the
        tokens' masks."""
        self.num_matching = reference.shape[1]
        if self.unified:
            self.pixels_for(memory)
            self.selected_logits = self.predict_masks(selected)

    def num_denoising(self, tgt: Tensor) -> int:
        """Denoising queries in front of the matching ones (0 without a selection)."""
        return 0 if self.num_matching is None else tgt.shape[1] - self.num_matching

    def initial_masks(self, tgt: Tensor) -> Tensor:
        """Layer 0's guiding masks (B, Q, h, w): the selected tokens' for the matching queries
        (unified; each query group repeats them), else every query's own from ``tgt``."""
        if self.selected_logits is None:
            return self.predict_masks(tgt)
        num_dn = self.num_denoising(tgt)
        matching = self.selected_logits.repeat(1, self.num_matching // self.selected_logits.shape[1], 1, 1)
        return torch.cat([self.predict_masks(tgt[:, :num_dn]), matching], 1) if num_dn else matching

    def __call__(self, index: int, tgt: Tensor, reference_points: Tensor, memory: Tensor):
        """-> (reference points for layer ``index``, its cross-attention's weight filter)."""
        self.pixels_for(memory)
        logits = self.initial_masks(tgt) if index == 0 else self.predict_masks(tgt)
        self.mask_logits.append(logits)
        allowed = level_attention_masks(logits, self.level_padding)

        def weight_filter(weights: Tensor, locations: Tensor) -> Tensor:
            return masked_sampling_weights(weights, locations, allowed, self.shapes)

        if self.mode == "masked+boxes":
            if reference_points.shape[-1] != 4:
                raise ValueError("model.mask_attention='masked+boxes' needs box references "
                                 "(model.detector.two_stage: true)")
            padding = mask_to_feature(self.padding_mask, tuple(logits.shape[-2:]))
            boxes, found = boxes_from_masks(logits, padding)
            if index == 0:  # denoising queries start from the noised box they are to denoise
                found[:, :self.num_denoising(tgt)] = False
            reference_points = torch.where(found[..., None], boxes.to(reference_points.dtype), reference_points)
        return reference_points, weight_filter
