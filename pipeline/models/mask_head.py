"""Universal segmenter: a Deformable DETR or DINO whose every decoder query also predicts a mask.

mask logits = (per-query mask embedding) . (per-pixel embedding), as MaskFormer / Mask2Former:

- a pixel decoder turns the encoder memory of the finest level (stride 8) and the backbone's
  stride-4 map into per-pixel embeddings (B, D, H/4, W/4) (FPN style: lateral 1x1 conv + upsampled
  coarser map, 3x3 conv, GroupNorm, ReLU), or (B, D, H/8, W/8) with ``pixel_stride=8``;
- an MLP maps each decoder layer's query states (B, Q, C) to mask embeddings (B, Q, D);
- "pred_masks" (B, Q, h, w) = einsum, for the last layer and in every "aux_outputs" entry.

Masks cover the padded batch canvas (as the targets after ``pipeline.losses.masks.pad_masks``).
The detector part keeps the parameter names of ``pipeline/models/detr.py`` (``backbone.body``,
``transformer``, ``class_embed``...), so a DETR export loads into it with only the new
``pixel_decoder.*`` and ``mask_embed.*`` keys reported missing.

``mask_attention`` (``SegmenterConfig``): "none" (the decoder attends to the whole image),
"masked" (Mask2Former's masked attention on the deformable sampling points) or "masked+boxes"
(and Mask DINO's mask-guided reference boxes); see ``pipeline/models/masked_attention.py``. It
adds no parameter: the masks that guide layer i are the head's own prediction from layer i-1.
The box head and its losses stay in every mode, so one export gives boxes and masks.

``unified_query_selection`` (two-stage detectors; Mask DINO's unified query selection): the
encoder's top-k selected tokens predict masks too; they guide the first decoder layer and are
returned in training as "enc_selected" ({"pred_logits", "pred_boxes", "pred_masks"} of the K
tokens) for the criterion's ``loss_mask_enc`` / ``loss_dice_enc``. The detector may be
``kind: dino`` (``DINOSegmenter``): its denoising queries then predict masks as well, returned in
training in "dn_outputs" for ``loss_mask_dn`` / ``loss_dice_dn`` of the positives
(``pipeline/losses/denoising.py``). Neither adds a parameter, and inference returns the same keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.backbone import BackboneConfig, build_backbone
from pipeline.models.detr import (
    MLP,
    DeformableDETR,
    DetectorConfig,
    feature_masks,
    group_norm,
)
from pipeline.models.dino import DINO
from pipeline.models.masked_attention import MASK_ATTENTION_MODES, MaskGuidance

PIXEL_STRIDES = (4, 8)
SEGMENTER_DETECTORS = ("deformable", "dino")  # multi-scale detectors whose encoder memory the pixel decoder reads


@dataclass
class MaskHeadConfig:
    """Pixel decoder and mask embedding sizes."""

    mask_dim: int = 256  # channels of per-pixel and per-query mask embeddings (Mask2Former: 256)
    pixel_stride: int = 4  # stride of the mask logits: 4 (backbone stride-4 lateral) or 8 (memory only)
    mask_embed_layers: int = 3  # layers of the query -> mask embedding MLP

    def __post_init__(self) -> None:
        if self.mask_dim < 1:
            raise ValueError(f"MaskHeadConfig.mask_dim must be >= 1, got {self.mask_dim}")
        if self.pixel_stride not in PIXEL_STRIDES:
            raise ValueError(f"MaskHeadConfig.pixel_stride must be one of {PIXEL_STRIDES}, got {self.pixel_stride}")
        if self.mask_embed_layers < 1:
            raise ValueError(f"MaskHeadConfig.mask_embed_layers must be >= 1, got {self.mask_embed_layers}")


@dataclass
class SegmenterConfig:
    """A Deformable DETR or DINO detector plus the mask head."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)  # kind "deformable" or "dino"
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)  # pixel decoder, mask embeddings
    mask_attention: str = "none"  # "none" | "masked" (Mask2Former) | "masked+boxes" (+ Mask DINO boxes)
    # Mask DINO: the encoder's top-k tokens predict masks (mask losses "_enc"; they guide decoder
    # layer 0); needs two_stage. None: on when two_stage and mask_attention is not "none".
    unified_query_selection: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.detector, dict):
            self.detector = DetectorConfig(**self.detector)
        if isinstance(self.mask_head, dict):
            self.mask_head = MaskHeadConfig(**self.mask_head)
        if self.detector.kind not in SEGMENTER_DETECTORS:
            raise ValueError(f"SegmenterConfig.detector.kind must be one of {SEGMENTER_DETECTORS} (the pixel "
                             f"decoder reads the multi-scale encoder memory), got {self.detector.kind!r}")
        if self.mask_attention not in MASK_ATTENTION_MODES:
            raise ValueError(f"SegmenterConfig.mask_attention must be one of {MASK_ATTENTION_MODES}, "
                             f"got {self.mask_attention!r}")
        if self.mask_attention == "masked+boxes" and not self.detector.two_stage:
            raise ValueError("model.mask_attention='masked+boxes' needs model.detector.two_stage: true "
                             "(the mask boxes replace reference boxes, as in Mask DINO)")
        if self.unified_query_selection is None:
            self.unified_query_selection = self.detector.two_stage and self.mask_attention != "none"
        if self.unified_query_selection and not self.detector.two_stage:
            raise ValueError("model.unified_query_selection: true needs model.detector.two_stage: true "
                             "(the masks are predicted by the encoder's top-k selected tokens)")
        strides = self.detector.backbone.out_strides
        if strides[0] != 8:
            raise ValueError("SegmenterConfig: detector.backbone.out_strides must start at 8 (the pixel "
                             f"decoder's finest memory level), got {strides}")


class PixelDecoder(nn.Module):
    """Finest encoder level (B, C, H/8, W/8) [+ backbone (B, C4, H/4, W/4)] -> (B, D, h, w)."""

    def __init__(self, d_model: int, mask_dim: int, high_res_channels: int | None):
        super().__init__()
        self.lateral: nn.Module | None = None
        if high_res_channels is not None:
            self.lateral = nn.Sequential(nn.Conv2d(high_res_channels, d_model, 1, bias=False), group_norm(d_model))
        self.output_conv = nn.Sequential(
            nn.Conv2d(d_model, d_model, 3, padding=1, bias=False), group_norm(d_model), nn.ReLU()
        )
        self.mask_features = nn.Conv2d(d_model, mask_dim, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)  # c2_xavier_fill, as detectron2's FPN
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

    def forward(self, finest: Tensor, high_res: Tensor | None) -> Tensor:
        if self.lateral is not None and high_res is not None:
            up = F.interpolate(finest, size=high_res.shape[-2:], mode="bilinear", align_corners=False)
            finest = self.lateral(high_res) + up
        return self.mask_features(self.output_conv(finest))


def memory_levels(memory: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Flattened (B, S, C) encoder memory -> one (B, C, h_l, w_l) map per level."""
    sizes = [h * w for h, w in shapes]
    return [
        level.transpose(1, 2).reshape(memory.shape[0], memory.shape[2], h, w)
        for level, (h, w) in zip(memory.split(sizes, dim=1), shapes)
    ]


class DeformableSegmenter(DeformableDETR):
    """Deformable DETR + pixel decoder + per-query mask embeddings (see the module docstring).

    The backbone returns one map more than the detector uses (stride 4, first) when
    ``pixel_stride=4``; the detector's input projections see the other maps only.
    """

    def __init__(self, cfg: SegmenterConfig, backbone):
        super().__init__(cfg.detector, backbone)
        self.segmenter_cfg = cfg
        det, head = cfg.detector, cfg.mask_head
        self.uses_high_res = head.pixel_stride == 4
        channels = list(backbone.num_channels)
        high_res_channels = channels.pop(0) if self.uses_high_res else None
        # The parent built projections for every backbone map: rebuild them for the detector's maps.
        self.input_proj = self._input_projections(channels, det.hidden_dim, det.num_feature_levels)
        self.pixel_decoder = PixelDecoder(det.hidden_dim, head.mask_dim, high_res_channels)
        self.mask_embed = MLP(det.hidden_dim, det.hidden_dim, head.mask_dim, head.mask_embed_layers)

    def multi_scale_inputs(self, images: Tensor, padding_mask: Tensor):
        """-> (srcs, masks, pos) of the detector's levels and the (B, C4, H/4, W/4) map or None."""
        features = self.backbone(images)
        high_res = features.pop(0) if self.uses_high_res else None
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        for level in range(len(features), len(self.input_proj)):
            srcs.append(self.input_proj[level](features[-1] if level == len(features) else srcs[-1]))
        masks = feature_masks(padding_mask, srcs)
        pos = [self.position(mask).to(src.dtype) for mask, src in zip(masks, srcs)]
        return (srcs, masks, pos), high_res

    def forward(self, images: Tensor, padding_mask: Tensor, targets: list[dict] | None = None) -> dict:
        """images (B, 3, H, W), padding_mask (B, H, W) -> the detector dict + "pred_masks"
        (B, Q, ceil(H / s), ceil(W / s)) mask logits, s = pixel_stride, also in "aux_outputs";
        in training "enc_selected" (unified query selection) and, DINO with ``targets``, the
        denoising keys (masks in "dn_outputs" too)."""
        (srcs, masks, pos), high_res = self.multi_scale_inputs(images, padding_mask)
        shapes = [tuple(s.shape[-2:]) for s in srcs]

        def pixels_of(memory: Tensor) -> Tensor:  # (B, D, h, w)
            return self.pixel_decoder(memory_levels(memory, shapes)[0], high_res)

        seg = self.segmenter_cfg
        guide = MaskGuidance(seg.mask_attention, self.mask_embed, pixels_of, masks, padding_mask,
                             unified=seg.unified_query_selection)
        out, dn = self.decode(srcs, masks, pos, targets, layer_hook=None if seg.mask_attention == "none" else guide,
                              selection_hook=guide.select if self.cfg.two_stage else None)
        outputs = self.detection_outputs(out)
        layer_masks = self.layer_masks(out, guide)
        outputs["pred_masks"] = layer_masks[-1]
        for aux, masks_of_layer in zip(outputs["aux_outputs"], layer_masks[:-1]):
            aux["pred_masks"] = masks_of_layer
        if self.training and guide.selected_logits is not None:
            outputs["enc_selected"] = selected_outputs(out, guide.selected_logits)
        return self.training_outputs(outputs, dn) if self.training and targets is not None else outputs

    def layer_masks(self, out: dict, guide: MaskGuidance) -> list[Tensor]:
        """(B, Q, h, w) mask logits of every decoder layer (the last only without aux_loss). With
        masked attention, layer i's masks are those that guided layer i + 1, already computed;
        only the last layer's are new."""
        hidden = out["hidden"]  # (layers, B, Q, C)
        if self.segmenter_cfg.mask_attention == "none":
            layers = hidden if self.cfg.aux_loss else hidden[-1:]
            return list(torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(layers), guide.pixels_for(out["memory"])))
        last = guide.predict_masks(hidden[-1])
        return [*guide.mask_logits[1:], last] if self.cfg.aux_loss else [last]


class DINOSegmenter(DeformableSegmenter, DINO):
    """DINO + the mask head: the segmenter's forward with DINO's decoding (denoising queries,
    mixed query selection, query groups); ``needs_targets`` as DINO's."""


def selected_outputs(out: dict, mask_logits: Tensor) -> dict:
    """The encoder's top-k tokens: their (B, K, C) class logits, (B, K, 4) boxes and the (B, K, h, w)
    mask logits they predicted, for the criterion's "_enc" mask losses."""
    index = out["enc_topk"]
    logits = torch.gather(out["enc_class"], 1, index[..., None].expand(-1, -1, out["enc_class"].shape[-1]))
    boxes = torch.gather(out["enc_coord_unact"], 1, index[..., None].expand(-1, -1, 4)).sigmoid()
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": mask_logits}


def segmenter_backbone_config(cfg: SegmenterConfig) -> BackboneConfig:
    """The detector's backbone config with the stride-4 map added when the pixel decoder needs it."""
    backbone = cfg.detector.backbone
    if cfg.mask_head.pixel_stride == 4:
        return dataclasses.replace(backbone, out_strides=[4, *backbone.out_strides])
    return backbone


def build_segmenter(cfg: SegmenterConfig) -> DeformableSegmenter:
    """The segmenter for ``cfg`` (backbone weights from ``cfg.detector.backbone.weights`` if set)."""
    segmenter = DINOSegmenter if cfg.detector.kind == "dino" else DeformableSegmenter
    return segmenter(cfg, build_backbone(segmenter_backbone_config(cfg)))
