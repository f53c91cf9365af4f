"""Load classifier weights (a stage-1 export or any local timm checkpoint) into a Backbone.

timm's own ``checkpoint_path=`` fails with ``features_only``: the classifier keys (``fc``,
``head``) have no place in the features model, and some families rename modules
(``stages.0`` -> ``stages_0``, ViT's wrapper adds ``model.``). Here keys are matched on a
normalised form (``_`` == ``.``), wrapper prefixes (``module.``, ``model.``, ``backbone.``) are
stripped when that gives more matches, and a report lists what was missing, unexpected or of the
wrong shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.models.backbone import Backbone, normalize_key

WRAPPER_PREFIXES = ("", "module.", "model.", "backbone.", "module.model.", "model.model.", "backbone.body.")
NESTED_STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
# Buffers that carry no learned information and are absent from frozen BatchNorm.
IGNORED_SUFFIXES = ("num_batches_tracked",)


class WeightsFileError(ValueError):
    """A weights file that cannot be read as a state dict."""


@dataclass
class LoadReport:
    """What a partial load did: target keys loaded / missing, source keys unused or mismatched."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # target keys with no source tensor
    unexpected: list[str] = field(default_factory=list)  # source keys not used (e.g. classifier)
    mismatched: list[str] = field(default_factory=list)  # "key: source shape -> target shape"

    def summary(self) -> str:
        """One readable paragraph for logs."""
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... (+{len(keys) - 12})" if len(keys) > 12 else "")
                lines.append(f"{title} ({len(keys)}): {shown}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file (``weights_only=True``), unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"pipeline/models/backbone_weights.py: no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types
        raise WeightsFileError(
            f"pipeline/models/backbone_weights.py: cannot read {path} with weights_only=True ({error}); "
            "re-save it as a plain state dict or a .safetensors file"
        ) from error
    return unwrap_state_dict(state, path)


def unwrap_state_dict(state: object, origin: object = "state") -> dict[str, Tensor]:
    """Follow ``{"state_dict": ...}``-style nesting down to the dict of tensors."""
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        nested = next((state[k] for k in NESTED_STATE_KEYS if k in state), None)
        if nested is None:
            raise WeightsFileError(
                f"pipeline/models/backbone_weights.py: {origin} holds no tensors; top-level keys "
                f"{list(state)[:10]}, expected a state dict or one under {NESTED_STATE_KEYS}"
            )
        state = nested
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"pipeline/models/backbone_weights.py: {origin} is not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


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


def load_state_dict_partial(module: nn.Module, source: Mapping[str, Tensor]) -> LoadReport:
    """Copy every source tensor that matches a key and shape of ``module``; report the rest."""
    target = module.state_dict()
    mapping = match_keys(list(target), list(source))
    report = LoadReport()
    to_load = {}
    for key in target:
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key not in mapping:
            report.missing.append(key)
            continue
        tensor = source[mapping[key]]
        if tensor.shape != target[key].shape:
            report.mismatched.append(f"{key}: {tuple(tensor.shape)} -> {tuple(target[key].shape)}")
            continue
        to_load[key] = tensor.to(target[key].dtype)
        report.loaded.append(key)
    used = set(mapping.values())
    report.unexpected = [k for k in source if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    module.load_state_dict(to_load, strict=False)
    return report


def load_backbone_weights(backbone: Backbone, weights: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Load a classifier state dict (path or mapping) into ``backbone.body``; returns the report."""
    source = read_state_dict(weights) if isinstance(weights, str | Path) else unwrap_state_dict(weights)
    report = load_state_dict_partial(backbone.body, source)
    if not report.loaded:
        raise WeightsFileError(
            f"pipeline/models/backbone_weights.py: no tensor of {weights if isinstance(weights, str | Path) else 'the state dict'} "
            f"matches backbone {backbone.cfg.name!r}; first source keys {list(source)[:5]}, "
            f"first model keys {list(backbone.body.state_dict())[:5]}"
        )
    return report
