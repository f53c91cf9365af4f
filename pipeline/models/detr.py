"""Detectors: multi-scale ``DeformableDETR`` and single-scale ``DETR``, built from a
``DetectorConfig`` by ``build_detector``.

Forward contract (both): ``model(images (B, 3, H, W), padding_mask (B, H, W) bool True on
padding)`` -> {"pred_logits": (B, Q, C) sigmoid/focal logits (Deformable) or (B, Q, C + 1)
softmax logits with no-object last (DETR), "pred_boxes": (B, Q, 4) cx, cy, w, h in [0, 1] of the
unpadded image, "aux_outputs": [same keys] per earlier decoder layer (empty without aux_loss),
"enc_outputs" (two-stage only): encoder proposals}.

Parameter names follow the official implementations (``class_embed``, ``bbox_embed.N.layers``,
``input_proj``, ``query_embed``, ``transformer``); the backbone lives under ``backbone.body``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.backbone import Backbone, BackboneConfig
from pipeline.models.deformable_transformer import DeformableTransformer, inverse_sigmoid
from pipeline.models.denoising import DenoisingConfig
from pipeline.models.position import PositionEmbeddingSine, mask_to_feature
from pipeline.models.transformer import Transformer

DETECTOR_KINDS = ("deformable", "detr", "dino")
FOCAL_PRIOR = 0.01  # initial foreground probability of the sigmoid class head (RetinaNet)


@dataclass
class DetectorConfig:
    """Architecture of a DETR-family detector (defaults: Deformable DETR, R50, paper sizes)."""

    kind: str = "deformable"  # "deformable" (multi-scale, focal head) | "detr" (single-scale, softmax head) | "dino" (dino.py)
    num_classes: int = 91  # foreground classes; read it from the data set, not a constant
    num_queries: int = 300  # object queries (two-stage: top-k proposals)
    hidden_dim: int = 256  # transformer width
    num_feature_levels: int = 4  # deformable: levels; those beyond the backbone's maps are stride-2 convs
    enc_layers: int = 6  # encoder layers
    dec_layers: int = 6  # decoder layers
    nheads: int = 8  # attention heads
    enc_n_points: int = 4  # deformable: sampling points per head and level in the encoder
    dec_n_points: int = 4  # deformable: sampling points per head and level in the decoder
    dim_feedforward: int = 1024  # FFN width (DETR paper: 2048)
    dropout: float = 0.1  # dropout in the transformer
    two_stage: bool = False  # deformable: queries from the top-k encoder proposals ("enc_outputs")
    box_refine: bool = False  # deformable: each decoder layer refines the previous layer's boxes
    aux_loss: bool = True  # return "aux_outputs" of every decoder layer but the last
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)  # dino: contrastive denoising queries
    train_query_groups: int = 1  # dino: Group-DETR, K query groups matched separately in training (1 at inference)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # feature extractor

    @property
    def focal(self) -> bool:
        """Whether the class head is sigmoid/focal (C logits) rather than softmax with no-object
        (C + 1): the one owner of the head type that matcher, criterion and post-processing follow."""
        return self.kind != "detr"

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if isinstance(self.denoising, dict):
            self.denoising = DenoisingConfig(**self.denoising)
        if self.train_query_groups < 1 or (self.train_query_groups > 1 and self.kind != "dino"):
            raise ValueError(f"DetectorConfig.train_query_groups must be >= 1 and > 1 only with kind='dino', "
                             f"got {self.train_query_groups} with kind={self.kind!r}")
        if self.kind not in DETECTOR_KINDS:
            raise ValueError(f"DetectorConfig.kind must be one of {DETECTOR_KINDS}, got {self.kind!r}")
        for name in ("num_classes", "num_queries", "hidden_dim", "enc_layers", "dec_layers", "nheads", "dim_feedforward"):
            if getattr(self, name) < 1:
                raise ValueError(f"DetectorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(
                f"DetectorConfig.hidden_dim ({self.hidden_dim}) must be even and divisible by nheads ({self.nheads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DetectorConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.kind != "detr" and self.num_feature_levels < len(self.backbone.out_strides):
            raise ValueError(
                f"DetectorConfig.num_feature_levels ({self.num_feature_levels}) must be >= the number "
                f"of backbone maps (backbone.out_strides={self.backbone.out_strides})"
            )
        if self.kind == "detr" and (self.two_stage or self.box_refine):
            raise ValueError("DetectorConfig: two_stage and box_refine need kind='deformable'")


class MLP(nn.Module):
    """Feed-forward net with ReLU between layers (the 3-layer box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


def collect_outputs(logits: Tensor, boxes: Tensor, aux_loss: bool) -> dict:
    """Per-layer (layers, B, Q, C) logits and (layers, B, Q, 4) boxes -> the forward contract."""
    aux = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])] if aux_loss else []
    return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}


def feature_masks(padding_mask: Tensor, features: list[Tensor]) -> list[Tensor]:
    """(B, H, W) padding mask -> one (B, h_l, w_l) mask per feature map."""
    return [mask_to_feature(padding_mask, tuple(f.shape[-2:])) for f in features]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (official) or fewer when a small width is not divisible."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class DetectorBase(nn.Module):
    """What both detectors share: parameter groups for the optimiser, class head reset."""

    backbone: Backbone
    # substrings of parameter names trained at a reduced lr in Deformable DETR (its
    # lr_linear_proj_names): the sampling-offset and reference-point projections
    linear_proj_names = ("reference_points", "sampling_offsets")
    decoder_trace = None  # a DecoderTrace while ``pipeline.models.trace.record_decoder`` is on

    def trace_layers(self, logits: Tensor, boxes: Tensor) -> None:
        """Hand every layer's (layers, B, Q, C) logits and (layers, B, Q, 4) boxes to the trace."""
        if self.decoder_trace is not None:
            self.decoder_trace.layer_logits = logits.detach()
            self.decoder_trace.layer_boxes = boxes.detach()

    def param_group(self, name: str) -> str:
        """Optimiser group of parameter ``name``: "backbone" (the pretrained body, lr x
        backbone_lr_mult), "linear_proj" (sampling offsets and reference points, lr x
        linear_proj_lr_mult as in Deformable DETR) or "default" (everything else, new layers
        of the backbone such as a ViT's feature pyramid included)."""
        if name.startswith("backbone."):
            return self.backbone.param_group(name.removeprefix("backbone."))
        if any(key in name for key in self.linear_proj_names):
            return "linear_proj"
        return "default"

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze the whole backbone (``BackboneConfig.freeze_steps``); see ``Backbone.set_frozen``."""
        self.backbone.set_frozen(frozen)


class DeformableDETR(DetectorBase):
    """Deformable DETR: multi-scale deformable transformer, sigmoid (focal) class head."""

    def __init__(self, cfg: DetectorConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d = cfg.hidden_dim
        self.position = PositionEmbeddingSine(d // 2, normalize=True, offset=-0.5)
        self.transformer = DeformableTransformer(
            d, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.dropout,
            cfg.num_feature_levels, cfg.dec_n_points, cfg.enc_n_points, cfg.two_stage, cfg.num_queries,
        )
        self.input_proj = self._input_projections(backbone.num_channels, d, cfg.num_feature_levels)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)
        num_pred = cfg.dec_layers + (1 if cfg.two_stage else 0)
        self.class_embed, self.bbox_embed = self._heads(d, cfg.num_classes, num_pred)

    @staticmethod
    def _input_projections(channels: list[int], d: int, num_levels: int) -> nn.ModuleList:
        """1x1 conv + GroupNorm per backbone map; 3x3 stride-2 conv + GroupNorm per extra level."""
        projections = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), group_norm(d)) for c in channels]
        in_channels = channels[-1]
        for _ in range(num_levels - len(channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, d, 3, stride=2, padding=1), group_norm(d)))
            in_channels = d
        for projection in projections:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0)
        return nn.ModuleList(projections)

    def _heads(self, d: int, num_classes: int, num_pred: int) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Class and box heads per decoder layer (+1 for two-stage proposals): separate with box
        refinement, else one shared module repeated (as the official code, so keys match)."""
        class_embed = self._class_head(d, num_classes)
        bbox_embed = MLP(d, d, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        if self.cfg.box_refine:
            class_heads = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            box_heads = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(box_heads[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            class_heads = nn.ModuleList([class_embed] * num_pred)
            box_heads = nn.ModuleList([bbox_embed] * num_pred)
        if self.cfg.two_stage:
            for box_head in box_heads:
                nn.init.constant_(box_head.layers[-1].bias[2:], 0.0)
        return class_heads, box_heads

    @staticmethod
    def _class_head(d: int, num_classes: int) -> nn.Linear:
        head = nn.Linear(d, num_classes)
        nn.init.constant_(head.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))
        return head

    def reset_class_head(self, num_classes: int) -> None:
        """New class count (fine-tuning): fresh focal-initialised class heads, same sharing."""
        shared = len({id(m) for m in self.class_embed}) == 1
        heads = [self._class_head(self.cfg.hidden_dim, num_classes) for _ in range(1 if shared else len(self.class_embed))]
        device = self.class_embed[0].weight.device
        self.class_embed = nn.ModuleList(heads * len(self.class_embed) if shared else heads).to(device)
        self.cfg.num_classes = num_classes

    def multi_scale_inputs(self, images: Tensor, padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """-> projected maps (B, C, h_l, w_l), masks (B, h_l, w_l), position embeddings per level."""
        features = self.backbone(images)
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        for level in range(len(features), len(self.input_proj)):
            srcs.append(self.input_proj[level](features[-1] if level == len(features) else srcs[-1]))
        masks = feature_masks(padding_mask, srcs)
        pos = [self.position(mask).to(src.dtype) for mask, src in zip(masks, srcs)]
        return srcs, masks, pos

    def forward(self, images: Tensor, padding_mask: Tensor) -> dict:
        srcs, masks, pos = self.multi_scale_inputs(images, padding_mask)
        return self.detection_outputs(self.decode(srcs, masks, pos)[0])

    def decode(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor], targets: list[dict] | None = None,
               layer_hook=None, selection_hook=None) -> tuple[dict, None]:
        """The transformer's output dict for the levels of ``multi_scale_inputs`` and no denoising
        queries (``targets`` unused: DINO's override takes them); hooks as the transformer's."""
        query_embed = None if self.cfg.two_stage else self.query_embed.weight
        out = self.transformer(
            srcs, masks, pos, query_embed, self.class_embed, self.bbox_embed, refine_boxes=self.cfg.box_refine,
            layer_hook=layer_hook, selection_hook=selection_hook,
        )
        return out, None

    def training_outputs(self, outputs: dict, dn: None) -> dict:
        """The training forward's outputs: the same as at inference (DINO adds its denoising keys)."""
        return outputs

    def detection_outputs(self, out: dict) -> dict:
        """The transformer's output (per-layer "hidden", "references"...) -> the forward contract."""
        logits, boxes = [], []
        for layer, hidden in enumerate(out["hidden"]):
            reference = inverse_sigmoid(out["references"][layer])
            delta = self.bbox_embed[layer](hidden)
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[layer](hidden))
            boxes.append(delta.sigmoid())
        logits, boxes = torch.stack(logits), torch.stack(boxes)
        self.trace_layers(logits, boxes)
        outputs = collect_outputs(logits, boxes, self.cfg.aux_loss)
        if self.cfg.two_stage:
            outputs["enc_outputs"] = {"pred_logits": out["enc_class"], "pred_boxes": out["enc_coord_unact"].sigmoid()}
        return outputs


class DETR(DetectorBase):
    """DETR: single-scale transformer on the backbone's last map, softmax head with no-object."""

    def __init__(self, cfg: DetectorConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d = cfg.hidden_dim
        self.position = PositionEmbeddingSine(d // 2, normalize=True)
        self.transformer = Transformer(d, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.dropout)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], d, kernel_size=1)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)

    def reset_class_head(self, num_classes: int) -> None:
        """New class count (fine-tuning): a fresh class head with num_classes + 1 outputs."""
        device = self.class_embed.weight.device
        self.class_embed = nn.Linear(self.cfg.hidden_dim, num_classes + 1).to(device)
        self.cfg.num_classes = num_classes

    def forward(self, images: Tensor, padding_mask: Tensor) -> dict:
        feature = self.backbone(images)[-1]
        mask = mask_to_feature(padding_mask, tuple(feature.shape[-2:]))
        pos = self.position(mask).to(feature.dtype)
        hidden = self.transformer(self.input_proj(feature), mask, self.query_embed.weight, pos)
        logits, boxes = self.class_embed(hidden), self.bbox_embed(hidden).sigmoid()
        self.trace_layers(logits, boxes)
        return collect_outputs(logits, boxes, self.cfg.aux_loss)
