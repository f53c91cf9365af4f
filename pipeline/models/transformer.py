"""The single-scale transformer of DETR (Carion et al. 2020): standard multi-head attention,
post-norm layers, a final decoder norm applied to every layer's output.

Names follow facebookresearch/detr (``encoder.layers.N.self_attn``,
``decoder.layers.N.multihead_attn``, ``decoder.norm``) so its weights map one to one. Sequences
are (B, N, C) (batch first); the attention weights are layout independent.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, C); padding_mask (B, S) True on padding -> (B, S, C)."""
        q = k = src + pos
        attended = self.self_attn(q, k, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, padding_mask: Tensor) -> Tensor:
        """tgt, query_pos (B, Q, C); memory, pos (B, S, C); padding_mask (B, S) -> (B, Q, C)."""
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.multihead_attn(
            tgt + query_pos, memory + pos, memory, key_padding_mask=padding_mask, need_weights=False
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, padding_mask)
        return src


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, padding_mask: Tensor) -> Tensor:
        """-> (num_layers, B, Q, C), every layer's output through the shared final norm."""
        hidden = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, padding_mask)
            hidden.append(self.norm(tgt))
        return torch.stack(hidden)


class Transformer(nn.Module):
    """DETR's encoder-decoder over one flattened feature map."""

    def __init__(
        self, d_model: int = 256, n_heads: int = 8, num_encoder_layers: int = 6,
        num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
    ):
        super().__init__()
        self.d_model = d_model
        self.encoder = Encoder(EncoderLayer(d_model, n_heads, dim_feedforward, dropout), num_encoder_layers)
        self.decoder = Decoder(DecoderLayer(d_model, n_heads, dim_feedforward, dropout), num_decoder_layers, d_model)
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """src, pos (B, C, h, w); mask (B, h, w); query_embed (Q, C) -> (layers, B, Q, C)."""
        batch = src.shape[0]
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        memory = self.encoder(src, pos, mask)
        return self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos, mask)
