"""Weight interop with the official DETR (facebookresearch/detr) and Deformable DETR
(fundamentalvision/Deformable-DETR) model layouts.

Our detectors keep the official parameter names for everything but the backbone wrapper, so the
key map is short and explicit:

=====================================================  ==========================================
official key                                           ours
=====================================================  ==========================================
``backbone.0.body.<torchvision resnet name>``          ``backbone.body.<timm resnet name>`` (same)
``transformer.decoder.class_embed.N.*`` (Deformable)   dropped: a second reference to
``transformer.decoder.bbox_embed.N.*`` (Deformable)    ``class_embed.N`` / ``bbox_embed.N``
everything else (``transformer.*``, ``class_embed*``,  unchanged
``bbox_embed*``, ``query_embed.weight``,
``input_proj*``)
=====================================================  ==========================================

Official checkpoints store the state dict under ``"model"``; that wrapper is removed. Loading
(``pipeline.weights.load_partial``) copies what maps with the right shape and reports the rest,
so a checkpoint with another class count loads everything but the class heads (which keep their
fresh initialisation).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from pipeline.weights import (
    IGNORED_SUFFIXES,
    LoadReport,
    load_partial,
    read_state_dict,
    unwrap_state_dict,
)

# (official prefix, our prefix), applied first match wins
PREFIX_MAP: tuple[tuple[str, str], ...] = (("backbone.0.body.", "backbone.body."),)
# official keys that duplicate another key (the official decoder holds references to the heads)
DUPLICATE_PREFIXES: tuple[str, ...] = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


def official_to_ours(key: str) -> str | None:
    """Our name for an official key; None for the duplicate aliases."""
    if key.startswith(DUPLICATE_PREFIXES):
        return None
    for official, ours in PREFIX_MAP:
        if key.startswith(official):
            return ours + key[len(official):]
    return key


def ours_to_official(key: str) -> str:
    """Inverse of ``official_to_ours`` for the keys it maps."""
    for official, ours in PREFIX_MAP:
        if key.startswith(ours):
            return official + key[len(ours):]
    return key


def to_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our detector's state dict in the official layout, aliases included as the official
    Deformable DETR saves them (decoder heads with box refinement / two-stage)."""
    state = {ours_to_official(k): v for k, v in model.state_dict().items() if not k.endswith(IGNORED_SUFFIXES)}
    cfg = getattr(model, "cfg", None)
    for head, wanted in (("bbox_embed", getattr(cfg, "box_refine", False)), ("class_embed", getattr(cfg, "two_stage", False))):
        if wanted:
            state.update({f"transformer.decoder.{k}": v for k, v in list(state.items()) if k.startswith(head + ".")})
    return state


def load_official_state_dict(model: nn.Module, weights: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Load an official DETR / Deformable DETR state dict (or checkpoint file) into ``model``.

    The report's ``unexpected`` holds official keys with no place in our model, ``skipped`` the
    official aliases of the decoder heads."""
    source = read_state_dict(weights) if isinstance(weights, str | Path) else unwrap_state_dict(weights)
    return load_partial(model, source, official_to_ours)
