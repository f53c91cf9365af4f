"""Load classifier weights (a stage-1 export or any local timm checkpoint) into a Backbone.

timm's own ``checkpoint_path=`` fails with ``features_only``: the classifier keys (``fc``,
``head``) have no place in the features model, and some families rename modules
(``stages.0`` -> ``stages_0``, ViT's wrapper adds ``model.``). Here keys are matched on a
normalised form (``_`` == ``.``), wrapper prefixes (``module.``, ``model.``, ``backbone.``) are
stripped when that gives more matches, and ``pipeline.weights.load_partial`` copies what fits
and reports what was missing, unexpected or of the wrong shape.

This module does not import ``backbone.py`` (``build_backbone`` imports it): it works on any
module with a ``body`` (the timm features model) and a ``cfg.name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from pipeline.weights import (
    IGNORED_SUFFIXES,
    LoadReport,
    WeightsFileError,
    load_partial,
    read_state_dict,
    unwrap_state_dict,
)

__all__ = ["WeightsFileError", "load_backbone_weights", "match_keys", "normalize_key"]

WRAPPER_PREFIXES = ("", "module.", "model.", "backbone.", "module.model.", "model.model.", "backbone.body.")


def normalize_key(name: str) -> str:
    """Key form shared by a timm model and its features_only twin (``stages_0`` == ``stages.0``)."""
    return name.replace("_", ".")


def match_keys(target_keys: list[str], source_keys: list[str]) -> dict[str, str]:
    """target key -> source key, trying each wrapper prefix on both sides and keeping the best."""
    best: dict[str, str] = {}
    for source_prefix in WRAPPER_PREFIXES:
        by_norm = {
            normalize_key(k[len(source_prefix):]): k for k in source_keys if k.startswith(source_prefix)
        }
        for target_prefix in ("", "model."):
            matches = {}
            for key in target_keys:
                if key.startswith(target_prefix):
                    source = by_norm.get(normalize_key(key[len(target_prefix):]))
                    if source is not None:
                        matches[key] = source
            if len(matches) > len(best):
                best = matches
    return best


def load_backbone_weights(backbone: nn.Module, weights: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Load a classifier state dict (path or mapping) into ``backbone.body``; returns the report."""
    source = read_state_dict(weights) if isinstance(weights, str | Path) else unwrap_state_dict(weights)
    target_keys = [k for k in backbone.body.state_dict() if not k.endswith(IGNORED_SUFFIXES)]
    target_of = {src: tgt for tgt, src in match_keys(target_keys, list(source)).items()}
    # Unmatched source keys get a name no module key has, so they are reported as unexpected.
    report = load_partial(backbone.body, source, lambda key: target_of.get(key, f"<unmatched>{key}"))
    if not report.loaded:
        raise WeightsFileError(
            f"pipeline/models/backbone_weights.py: no tensor of {weights if isinstance(weights, str | Path) else 'the state dict'} "
            f"matches backbone {backbone.cfg.name!r}; first source keys {list(source)[:5]}, "
            f"first model keys {list(backbone.body.state_dict())[:5]}"
        )
    return report
