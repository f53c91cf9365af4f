"""Loading weights into a module by name, with a report: the one partial loader.

Every weight source (an export, a timm classifier checkpoint, an official DETR checkpoint) is
read into a ``{name: tensor}`` dict, its names are mapped to the module's (a prefix map, a
key matcher or an explicit table, supplied by the caller), and ``load_partial`` copies every
tensor whose name and shape fit. What did not fit keeps the module's own initialisation and is
listed in a ``LoadReport``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

NESTED_STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
# Buffers that carry no learned information (absent from frozen BatchNorm): loaded when both
# sides have them, never reported as missing or unexpected.
IGNORED_SUFFIXES = ("num_batches_tracked",)


class WeightsFileError(ValueError):
    """A weights file or mapping that cannot be read as a state dict, or loads nothing."""


class KeyMapError(ValueError):
    """A key map sends two source tensors to the same module key."""


@dataclass
class LoadReport:
    """What ``load_partial`` did with each key."""

    loaded: list[str] = field(default_factory=list)  # module keys copied from the source
    missing: list[str] = field(default_factory=list)  # module keys the source did not provide
    unexpected: list[str] = field(default_factory=list)  # source keys with no place in the module
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, source, module)
    skipped: list[str] = field(default_factory=list)  # source keys dropped on purpose (aliases)

    @property
    def complete(self) -> bool:
        """True when every module key was loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors; {len(self.missing)} missing (kept fresh "
                 f"init), {len(self.unexpected)} unexpected (ignored), {len(self.mismatched)} "
                 "shape-mismatched (kept fresh init)"]
        lines += [f"  missing:    {key}" for key in self.missing]
        lines += [f"  unexpected: {key}" for key in self.unexpected]
        lines += [f"  mismatched: {key} checkpoint {list(ckpt)} vs model {list(model)}"
                  for key, ckpt, model in self.mismatched]
        return "\n".join(lines)

    def summary(self, shown: int = 12) -> str:
        """A short paragraph for logs: counts and the first ``shown`` keys of each list."""
        mismatched = [f"{key}: {ckpt} -> {model}" for key, ckpt, model in self.mismatched]
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", mismatched)):
            if keys:
                more = f", ... (+{len(keys) - shown})" if len(keys) > shown else ""
                lines.append(f"{title} ({len(keys)}): {', '.join(keys[:shown])}{more}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file (``weights_only=True``), unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"pipeline/weights.py: no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types
        raise WeightsFileError(
            f"pipeline/weights.py: cannot read {path} with weights_only=True ({error}); "
            "re-save it as a plain state dict or a .safetensors file"
        ) from error
    return unwrap_state_dict(state, path)


def unwrap_state_dict(state: object, origin: object = "state") -> dict[str, Tensor]:
    """Follow ``{"state_dict": ...}``-style nesting down to the dict of tensors."""
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        nested = next((state[k] for k in NESTED_STATE_KEYS if k in state), None)
        if nested is None:
            raise WeightsFileError(
                f"pipeline/weights.py: {origin} holds no tensors; top-level keys "
                f"{list(state)[:10]}, expected a state dict or one under {NESTED_STATE_KEYS}"
            )
        state = nested
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"pipeline/weights.py: {origin} is not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def prefix_renamer(prefix_map: Mapping[str, str]) -> Callable[[str], str]:
    """key -> key with its longest matching prefix replaced ("" maps everything)."""
    prefixes = sorted(prefix_map, key=len, reverse=True)

    def rename(key: str) -> str:
        match = next((p for p in prefixes if key.startswith(p)), None)
        return key if match is None else prefix_map[match] + key[len(match):]

    return rename


KeyMap = Callable[[str], str | None] | Mapping[str, str]


def load_partial(module: nn.Module, source: Mapping[str, Tensor],
                 key_map: KeyMap | None = None) -> LoadReport:
    """Copy every source tensor whose mapped name and shape fit ``module``; the rest keeps the
    module's own initialisation (e.g. a class head with a new class count).

    ``key_map`` is a prefix map ({"model.body.": "backbone."}, longest prefix first) or a
    function source key -> module key, or None for a source key dropped on purpose (reported as
    skipped); default: the same names. Tensors are cast to the module's dtype. Raises
    KeyMapError when two source keys map to one module key.
    """
    if isinstance(key_map, Mapping):
        key_map = prefix_renamer(key_map)
    target = module.state_dict()
    report, fitting, seen = LoadReport(), {}, {}
    for key, tensor in source.items():
        name = key_map(key) if key_map is not None else key
        if name is None:
            report.skipped.append(key)
            continue
        if name in seen:
            raise KeyMapError(f"pipeline/weights.py: {seen[name]!r} and {key!r} both map to {name!r}; "
                              "fix the prefix map")
        seen[name] = key
        if name not in target:
            if not key.endswith(IGNORED_SUFFIXES):
                report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(target[name].shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        else:
            fitting[name] = tensor.to(target[name].dtype)
            report.loaded.append(name)
    report.missing = [k for k in target if k not in seen and not k.endswith(IGNORED_SUFFIXES)]
    module.load_state_dict(fitting, strict=False)
    return report
