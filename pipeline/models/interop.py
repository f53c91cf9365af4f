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
copies what maps with the right shape and reports the rest, so a checkpoint with another class
count loads everything but the class heads (which keep their fresh initialisation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from pipeline.models.backbone_weights import IGNORED_SUFFIXES, read_state_dict, unwrap_state_dict

# (official prefix, our prefix), applied first match wins
PREFIX_MAP: tuple[tuple[str, str], ...] = (("backbone.0.body.", "backbone.body."),)
# official keys that duplicate another key (the official decoder holds references to the heads)
DUPLICATE_PREFIXES: tuple[str, ...] = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


@dataclass
class InteropReport:
    """Outcome of loading an official state dict."""

    loaded: list[str] = field(default_factory=list)  # our keys filled
    unmapped: list[str] = field(default_factory=list)  # official keys with no place in our model
    missing: list[str] = field(default_factory=list)  # our keys the state dict did not provide
    mismatched: list[str] = field(default_factory=list)  # "key: official shape -> our shape"
    duplicates: list[str] = field(default_factory=list)  # official aliases skipped on purpose

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from the official layout"]
        for title, keys in (("unmapped", self.unmapped), ("missing", self.missing), ("shape mismatch", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... (+{len(keys) - 10})" if len(keys) > 10 else "")
                lines.append(f"{title} ({len(keys)}): {shown}")
        return "\n".join(lines)


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


def load_official_state_dict(model: nn.Module, weights: str | Path | Mapping[str, Tensor]) -> InteropReport:
    """Load an official DETR / Deformable DETR state dict (or checkpoint file) into ``model``."""
    source = read_state_dict(weights) if isinstance(weights, str | Path) else unwrap_state_dict(weights)
    target = model.state_dict()
    report, to_load = InteropReport(), {}
    for key, tensor in source.items():
        ours = official_to_ours(key)
        if ours is None:
            report.duplicates.append(key)
        elif key.endswith(IGNORED_SUFFIXES):
            continue
        elif ours not in target:
            report.unmapped.append(key)
        elif tensor.shape != target[ours].shape:
            report.mismatched.append(f"{ours}: {tuple(tensor.shape)} -> {tuple(target[ours].shape)}")
        else:
            to_load[ours] = tensor.to(target[ours].dtype)
    report.loaded = sorted(to_load)
    mismatched = {entry.split(":")[0] for entry in report.mismatched}
    report.missing = [
        k for k in target if k not in to_load and k not in mismatched and not k.endswith(IGNORED_SUFFIXES)
    ]
    model.load_state_dict(to_load, strict=False)
    return report
