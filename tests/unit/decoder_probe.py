"""A test probe on one decoder layer: the reference points each call received."""

from __future__ import annotations

import torch


def record_reference_points(model, layer: int) -> list[torch.Tensor]:
    """Wrap decoder layer ``layer`` of ``model`` so every call appends its ``reference_points``
    (B, Q, levels, 2 or 4) to the returned list; the layer's output is unchanged."""
    seen: list[torch.Tensor] = []
    original = model.transformer.decoder.layers[layer].forward

    def recording(tgt, query_pos, reference_points, *args, **kwargs):
        seen.append(reference_points)
        return original(tgt, query_pos, reference_points, *args, **kwargs)

    model.transformer.decoder.layers[layer].forward = recording
    return seen
