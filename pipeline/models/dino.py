"""DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes", ICLR 2023): the
Deformable-DETR detector (two-stage, box refinement) with contrastive denoising queries, mixed
query selection and look-forward-twice, plus Group-DETR training groups (Chen et al. 2023).

Forward contract: that of ``DeformableDETR`` (see detr.py). In training, with targets, the
outputs also hold "dn_outputs" ({"pred_logits" (B, P, C), "pred_boxes" (B, P, 4), "aux_outputs"}
or None when the batch has no box), "dn_meta" ({"groups", "max_boxes"}: the slot layout of
``pipeline/models/denoising.py``) and "query_groups" (K: the matching part holds K * Q queries,
group k in columns [k Q, (k + 1) Q)). Inference (``eval()``) returns the DeformableDETR keys only,
from Q queries.

Extra parameters (names as the official code): ``label_enc`` (denoising label embedding, C + 1
rows), ``transformer.tgt_embed`` (learned content queries, K * Q rows),
``transformer.decoder.ref_point_head``. A Deformable-DETR export loads partially into it and a
DINO export into a Deformable-DETR (the extra parameters are reported as unexpected).
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models.backbone import Backbone
from pipeline.models.deformable_transformer import DeformableTransformer
from pipeline.models.denoising import DenoisingQueries, make_denoising_queries, self_attention_mask
from pipeline.models.detr import DeformableDETR, DetectorConfig


def check_dino_config(cfg: DetectorConfig) -> None:
    """DINO's queries come from encoder proposals and refine boxes layer by layer."""
    if not (cfg.two_stage and cfg.box_refine):
        raise ValueError("model.kind=dino needs model.two_stage: true and model.box_refine: true "
                         "(mixed query selection and look-forward-twice build on both)")


class DINO(DeformableDETR):
    """DINO detector; see the module docstring for the outputs."""

    needs_targets = True  # training forward takes the targets (denoising queries)

    def __init__(self, cfg: DetectorConfig, backbone: Backbone):
        check_dino_config(cfg)
        super().__init__(cfg, backbone)
        d = cfg.hidden_dim
        self.transformer = DeformableTransformer(
            d, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.dropout,
            cfg.num_feature_levels, cfg.dec_n_points, cfg.enc_n_points, two_stage=True,
            two_stage_num_proposals=cfg.num_queries, mixed_selection=True, look_forward_twice=True,
            query_groups=cfg.train_query_groups,
        )
        # one row per class plus "no label" for padding slots
        self.label_enc = nn.Embedding(cfg.num_classes + 1, d)

    def reset_class_head(self, num_classes: int) -> None:
        """New class count: fresh class heads and denoising label embedding."""
        super().reset_class_head(num_classes)
        device = self.label_enc.weight.device
        self.label_enc = nn.Embedding(num_classes + 1, self.cfg.hidden_dim).to(device)

    def forward(self, images: Tensor, padding_mask: Tensor, targets: list[dict] | None = None) -> dict:
        """images (B, 3, H, W), padding_mask (B, H, W); targets (training): B dicts {"labels" (n,),
        "boxes" (n, 4) cx, cy, w, h normalised} on the images' device."""
        srcs, masks, pos = self.multi_scale_inputs(images, padding_mask)
        out, dn = self.decode(srcs, masks, pos, targets)
        outputs = self.detection_outputs(out)
        return self.training_outputs(outputs, dn) if self.training and targets is not None else outputs

    def decode(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor], targets: list[dict] | None = None,
               layer_hook=None, selection_hook=None) -> tuple[dict, DenoisingQueries | None]:
        """(the transformer's output dict, the denoising queries put before the matching ones or
        None): denoising queries only in training with targets; hooks as the transformer's."""
        training = self.training and targets is not None
        dn = make_denoising_queries(targets, self.cfg.denoising, self.cfg.num_classes) if training else None
        groups = self.cfg.train_query_groups if self.training else 1
        num_dn = dn.num_slots if dn is not None else 0
        mask = self_attention_mask(num_dn, 2 * dn.max_boxes if dn else 1, self.cfg.num_queries, groups,
                                   srcs[0].device)
        out = self.transformer(
            srcs, masks, pos, None, self.class_embed, self.bbox_embed, refine_boxes=True,
            dn_content=self.label_enc(dn.labels) if dn is not None else None,
            dn_reference=dn.boxes if dn is not None else None, self_attn_mask=mask,
            layer_hook=layer_hook, selection_hook=selection_hook,
        )
        return out, dn

    def training_outputs(self, outputs: dict, dn: DenoisingQueries | None) -> dict:
        """The forward contract's training keys: the matching part, "dn_outputs", "dn_meta",
        "query_groups" (see the module docstring)."""
        outputs, dn_outputs = split_denoising(outputs, dn.num_slots if dn is not None else 0)
        if dn is None:
            # The label embedding must get a gradient on every rank, or DeepSpeed / DDP wait
            # forever for the rank whose batch had no box.
            outputs["pred_logits"] = outputs["pred_logits"] + 0.0 * self.label_enc.weight.sum()
        outputs["dn_outputs"] = dn_outputs
        outputs["dn_meta"] = denoising_meta(dn)
        outputs["query_groups"] = self.cfg.train_query_groups
        return outputs


PER_QUERY_KEYS = ("pred_logits", "pred_boxes", "pred_masks")  # split along the query axis (masks: segmenters)


def denoising_meta(dn: DenoisingQueries | None) -> dict[str, int]:
    return {"groups": dn.groups if dn else 0, "max_boxes": dn.max_boxes if dn else 0}


def split_denoising(outputs: dict, num_dn: int) -> tuple[dict, dict | None]:
    """Split the detector (or segmenter) dict along the query axis: (matching part, denoising
    part or None)."""

    def part(layer: dict, keep: slice) -> dict:
        return {key: value[:, keep] for key, value in layer.items() if key in PER_QUERY_KEYS}

    dn_part, matching = slice(0, num_dn), slice(num_dn, None)
    split = {**outputs, **part(outputs, matching),
             "aux_outputs": [part(aux, matching) for aux in outputs["aux_outputs"]]}
    if num_dn == 0:
        return split, None
    dn = {**part(outputs, dn_part), "aux_outputs": [part(aux, dn_part) for aux in outputs["aux_outputs"]]}
    return split, dn
