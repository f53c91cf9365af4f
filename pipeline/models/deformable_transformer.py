"""Deformable DETR transformer: deformable encoder, decoder with optional iterative box
refinement, optional two-stage proposals (Zhu et al. 2021).

Module and parameter names follow the official implementation (``encoder.layers.N.self_attn``,
``decoder.layers.N.cross_attn``, ``level_embed``, ``reference_points``, ``enc_output``,
``pos_trans``) so its weights map one to one (``pipeline/models/interop.py``). The class and box
heads belong to the detector and are passed to ``forward``, never registered here twice.

DINO (Zhang et al. 2023) extends it here: ``mixed_selection`` (encoder top-k proposals give the
reference boxes, content queries stay learned in ``tgt_embed``; the query position is recomputed
from the current reference box in every layer by ``decoder.ref_point_head``), extra denoising
queries and a self-attention mask (``forward``'s ``dn_content`` / ``dn_reference`` /
``self_attn_mask``), ``query_groups`` (Group-DETR: K groups of learned queries in training, the
first one at inference) and ``look_forward_twice``.

Shapes: B batch, S = sum of h_l * w_l tokens over L levels, C = d_model, Q queries.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.ops import MSDeformAttn


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped away from 0 and 1 so the result stays finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _clones(module: nn.Module, count: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then the FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2); padding_mask (B, S) -> (B, S, C)."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: query self-attention, deformable cross-attention, FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
        spatial_shapes: Tensor, memory_padding_mask: Tensor, self_attn_mask: Tensor | None = None,
        sampling_filter=None,
    ) -> Tensor:
        """tgt, query_pos (B, Q, C); reference_points (B, Q, L, 2|4); memory (B, S, C);
        self_attn_mask (Q, Q) bool, True where a query may not attend; sampling_filter: the
        cross-attention's ``weight_filter`` (masked attention) or None -> (B, Q, C)."""
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask,
                                   sampling_filter)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(layer, num_layers)

    @staticmethod
    def reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised to the valid area -> (B, S, L, 2)."""
        points = []
        for level, (h, w) in enumerate(spatial_shapes.tolist()):
            ys, xs = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device),
                indexing="ij",
            )
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((xs, ys), -1))
        reference = torch.cat(points, 1)
        return reference[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes: Tensor, valid_ratios: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        reference = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference, spatial_shapes, padding_mask)
        return src


class DeformableDecoder(nn.Module):
    """Decoder layers; with ``dynamic_query_pos`` (DINO) a ``ref_point_head`` MLP turns each
    layer's reference box into its query position, and with ``look_forward_twice`` the returned
    references keep the gradient of the previous layer's refinement."""

    decoder_trace = None  # a DecoderTrace while ``pipeline.models.trace.record_decoder`` is on

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, dynamic_query_pos: bool = False,
                 look_forward_twice: bool = False):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.look_forward_twice = look_forward_twice
        self.d_model = layer.norm1.normalized_shape[0]
        if dynamic_query_pos:
            d = self.d_model
            self.ref_point_head = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d))

    def query_position(self, reference_points: Tensor) -> Tensor:
        """(B, Q, 4) sigmoid boxes -> (B, Q, C) positional query (DINO / DAB-DETR)."""
        return self.ref_point_head(proposal_pos_embed(inverse_sigmoid(reference_points), self.d_model // 2))

    def forward(
        self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
        valid_ratios: Tensor, query_pos: Tensor | None, memory_padding_mask: Tensor,
        bbox_embed: nn.ModuleList | None = None, self_attn_mask: Tensor | None = None,
        layer_hook=None,
    ) -> tuple[Tensor, list[Tensor]]:
        """-> hidden states (num_layers, B, Q, C), each layer's reference (B, Q, 2|4).

        With ``bbox_embed`` (iterative refinement), each layer's box prediction becomes the next
        layer's reference, detached as in the paper. The reference returned for layer i is its
        input, or with ``look_forward_twice`` the same box not detached: layer i's box loss then
        also trains layer i-1's prediction (DINO Sec. 3.5); only the reference passed on is detached.
        ``query_pos`` None: computed per layer by ``ref_point_head`` (needs 4-d references).
        ``layer_hook(index, tgt, reference_points, memory) -> (reference_points, sampling_filter)``
        runs before every layer (a segmenter's masked attention, ``pipeline/models/masked_attention.py``).
        """
        hidden, references = [], []
        undetached = reference_points
        if self.decoder_trace is not None:
            self.decoder_trace.valid_ratios = valid_ratios.detach()
        for index, layer in enumerate(self.layers):
            sampling_filter = None
            if layer_hook is not None:
                guided, sampling_filter = layer_hook(index, tgt, reference_points, memory)
                if guided is not reference_points:
                    undetached = reference_points = guided
            if reference_points.shape[-1] == 4:
                scaled = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                scaled = reference_points[:, :, None] * valid_ratios[:, None]
            position = self.query_position(reference_points) if query_pos is None else query_pos
            tgt = layer(tgt, position, scaled, memory, spatial_shapes, memory_padding_mask, self_attn_mask,
                        sampling_filter)
            hidden.append(tgt)
            references.append(undetached if self.look_forward_twice else reference_points)
            if bbox_embed is not None:
                delta = bbox_embed[index](tgt)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:
                    # point references become boxes after the first refinement, as the official code
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                undetached = refined.sigmoid()
                reference_points = undetached.detach()
        return torch.stack(hidden), references


def valid_ratios_of(mask: Tensor) -> Tensor:
    """(B, h, w) padding mask -> (B, 2) unpadded fraction (x, y) of the map."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
    valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
    return torch.stack([valid_w / width, valid_h / height], -1)


def proposal_pos_embed(proposals: Tensor, num_pos_feats: int) -> Tensor:
    """Sine embedding of (B, K, 4) unactivated boxes -> (B, K, 4 * num_pos_feats)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = proposals.sigmoid() * (2 * math.pi)
    pos = pos[:, :, :, None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


class DeformableTransformer(nn.Module):
    """Flattens the levels, runs encoder and decoder; queries come from ``query_embed`` (Q, 2C)
    (position half, content half) or, with ``two_stage``, from the top-k encoder proposals."""

    def __init__(
        self, d_model: int = 256, n_heads: int = 8, num_encoder_layers: int = 6,
        num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
        num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
        two_stage: bool = False, two_stage_num_proposals: int = 300, mixed_selection: bool = False,
        look_forward_twice: bool = False, query_groups: int = 1,
    ):
        super().__init__()
        if (mixed_selection or query_groups > 1) and not two_stage:
            raise ValueError("DeformableTransformer: mixed_selection and query_groups > 1 need two_stage=True")
        self.d_model, self.two_stage = d_model, two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.mixed_selection, self.query_groups = mixed_selection, query_groups
        enc_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, n_heads, enc_n_points)
        dec_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, n_heads, dec_n_points)
        self.encoder = DeformableEncoder(enc_layer, num_encoder_layers)
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers, mixed_selection, look_forward_twice)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if mixed_selection:
            # learned content queries, one block of Q per training group (group 0 at inference)
            self.tgt_embed = nn.Embedding(two_stage_num_proposals * query_groups, d_model)
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        elif two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)
        if self.mixed_selection:
            nn.init.normal_(self.tgt_embed.weight)

    def flatten_levels(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]):
        """Per-level (B, C, h, w) maps -> (B, S, C) tokens, (B, S) mask, (B, S, C) pos + level
        embedding, spatial_shapes int64 (L, 2) on the CPU, valid_ratios (B, L, 2).

        The shapes stay on the host: every layer reads them as Python ints (``tolist``, the
        token-count check), and a copy on the GPU made each of those reads a host-device
        synchronisation (14 per R50 step), which stalled the CPU that launches the kernels."""
        shapes = torch.as_tensor([src.shape[-2:] for src in srcs], dtype=torch.long)
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flat = torch.cat(
            [pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, pos in enumerate(pos_embeds)], 1
        )
        valid_ratios = torch.stack([valid_ratios_of(mask) for mask in masks], 1).to(src_flat.dtype)
        return src_flat, mask_flat, pos_flat, shapes, valid_ratios

    def encoder_proposals(self, memory: Tensor, mask_flat: Tensor, shapes: Tensor) -> tuple[Tensor, Tensor]:
        """Two-stage: one box proposal per token (its pixel, side 0.05 * 2^level) ->
        transformed memory (B, S, C), unactivated proposals (B, S, 4) (inf where invalid)."""
        batch = memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(shapes.tolist()):
            mask = mask_flat[:, start : start + h * w].view(batch, h, w)
            valid = torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1).to(memory.dtype)
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=memory.dtype, device=memory.device),
                torch.arange(w, dtype=memory.dtype, device=memory.device),
                indexing="ij",
            )
            grid = (torch.stack([xs, ys], -1)[None] + 0.5) / valid.view(batch, 1, 1, 2)
            wh = torch.full_like(grid, 0.05 * (2.0**level))
            proposals.append(torch.cat([grid, wh], -1).view(batch, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = mask_flat.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        memory = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def two_stage_queries(self, memory, mask_flat, shapes, class_embed, bbox_embed):
        """Top-k encoder proposals -> (query_pos, tgt, reference boxes, {"enc_class",
        "enc_coord_unact", "enc_topk" (B, K) token index, "enc_selected" (B, K, C) the transformed
        memory of those tokens, with gradient}).

        Mixed selection: query_pos None (the decoder derives it from the boxes), tgt the learned
        content queries; in training with query groups, the K groups share the top-k boxes.
        """
        output_memory, proposals = self.encoder_proposals(memory, mask_flat, shapes)
        layer = len(self.decoder.layers)  # the extra head after the last decoder layer
        enc_class = class_embed[layer](output_memory)
        enc_coord_unact = bbox_embed[layer](output_memory) + proposals
        topk = min(self.two_stage_num_proposals, enc_class.shape[1])
        # column 0: the criterion trains the proposals class-agnostically (every target is class 0)
        topk_index = torch.topk(enc_class[..., 0], topk, dim=1)[1]
        coords = torch.gather(enc_coord_unact, 1, topk_index.unsqueeze(-1).repeat(1, 1, 4)).detach()
        selected = torch.gather(output_memory, 1, topk_index.unsqueeze(-1).expand(-1, -1, self.d_model))
        enc = {"enc_class": enc_class, "enc_coord_unact": enc_coord_unact, "enc_topk": topk_index,
               "enc_selected": selected}
        if self.mixed_selection:
            groups = self.query_groups if self.training else 1
            reference = coords.sigmoid().repeat(1, groups, 1)
            # made on the device: a host tensor's copy there synchronised every forward
            rows = torch.cat([torch.arange(topk, device=memory.device) + g * self.two_stage_num_proposals
                              for g in range(groups)])
            tgt = self.tgt_embed.weight[rows].unsqueeze(0).expand(memory.shape[0], -1, -1)
            return None, tgt, reference, enc
        pos_trans = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(coords, self.d_model // 2)))
        query_pos, tgt = torch.split(pos_trans, self.d_model, dim=2)
        return query_pos, tgt, coords.sigmoid(), enc

    def forward(
        self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
        query_embed: Tensor | None, class_embed: nn.ModuleList | None = None,
        bbox_embed: nn.ModuleList | None = None, refine_boxes: bool = False,
        dn_content: Tensor | None = None, dn_reference: Tensor | None = None,
        self_attn_mask: Tensor | None = None, layer_hook=None, selection_hook=None,
    ) -> dict:
        """srcs / pos_embeds: per level (B, C, h_l, w_l); masks (B, h_l, w_l); query_embed (Q, 2C).

        Mixed selection only: ``dn_content`` (B, P, C) and ``dn_reference`` (B, P, 4) sigmoid boxes
        are denoising queries put before the matching ones; ``self_attn_mask`` (P + Q', P + Q')
        bool, True = may not attend (Q' = Q x query groups in training). ``layer_hook``: see
        ``DeformableDecoder.forward``. Two-stage: ``selection_hook(selected (B, K, C), reference
        (B, Q', 4), memory)`` sees the top-k selection before any denoising query is put in front
        (a segmenter's unified query selection, ``pipeline/models/masked_attention.py``).

        Returns "hidden" (layers, B, Q, C), "init_reference" (B, Q, 2|4), "references"
        (list per layer of (B, Q, 2|4): its input reference; points become boxes after refinement) and, two-stage,
        "enc_class" (B, S, classes), "enc_coord_unact" (B, S, 4), "enc_topk" (B, K) and
        "enc_selected" (B, K, C) (see ``two_stage_queries``); "memory" (B, S, C), the
        encoder output (level by level, as flattened; a segmentation head's pixel decoder reads it).
        """
        src_flat, mask_flat, pos_flat, shapes, valid_ratios = self.flatten_levels(srcs, masks, pos_embeds)
        memory = self.encoder(src_flat, shapes, valid_ratios, pos_flat, mask_flat)
        out: dict[str, Tensor] = {"memory": memory}
        if self.two_stage:
            query_pos, tgt, reference, enc = self.two_stage_queries(memory, mask_flat, shapes, class_embed, bbox_embed)
            out.update(enc)
            if selection_hook is not None:
                selection_hook(enc["enc_selected"], reference, memory)
            if dn_content is not None:
                if not self.mixed_selection:
                    raise ValueError("DeformableTransformer: denoising queries need mixed_selection=True")
                tgt = torch.cat([dn_content.to(tgt.dtype), tgt], 1)
                reference = torch.cat([dn_reference.to(reference.dtype), reference], 1)
        else:
            query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(memory.shape[0], -1, -1)
            tgt = tgt.unsqueeze(0).expand(memory.shape[0], -1, -1)
            reference = self.reference_points(query_pos).sigmoid()
        out["init_reference"] = reference
        out["hidden"], out["references"] = self.decoder(
            tgt, reference, memory, shapes, valid_ratios, query_pos, mask_flat,
            bbox_embed if refine_boxes else None, self_attn_mask, layer_hook,
        )
        return out
