"""Fold frozen batch norms into the convolutions that feed them.

A frozen batch norm is a fixed per-channel affine map, ``y = x * scale + shift``, so the conv
before it can apply it to its kernel instead: ``conv(x, w * scale) + shift``. That replaces two
activation-sized element-wise ops in the forward (and one in the backward) by weight-sized ones.
Measured as CPU time with one thread (stem and first stage frozen, batch 2): the frozen norms were
5% of a ResNet-50 backbone's forward + backward at 320x320 and ~0% of a ResNet-18's at 256x320;
on a GPU, where convolutions are fast and element-wise kernels memory-bound, their share is
larger (not measured yet).

The modules stay where they are and keep their parameters and buffers, so state dicts,
checkpoints, partial loading and pretrained weights are unchanged: the conv learns the same
``weight`` (its gradient passes through the scale), the absorbed norm keeps its statistics and
becomes the identity in the forward.

Pairs are found by the names ResNet-family models use for a conv feeding a norm directly:
``conv{k}`` / ``bn{k}`` siblings (timm's ResNet stems and blocks) and consecutive
``Conv2d`` / ``FrozenBatchNorm2d`` children of an ``nn.Sequential`` (downsample branches). Only a
plain ``nn.Conv2d`` and a norm with the ``FrozenBatchNorm2d`` buffers (torchvision's or timm's)
and as many channels as the conv's output are folded; anything else is left alone. The names are
trusted to mean "conv feeds norm": the forward's order is not inspected, so a model that names a
pre-activation norm ``bn{k}`` beside a same-width ``conv{k}`` would be folded wrongly (timm's
ResNet family, which the backbones use, names only conv-then-norm pairs so).
"""

from __future__ import annotations

from torch import Tensor, nn

_FROZEN_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """A FrozenBatchNorm2d of torchvision or timm: fixed affine map from four buffers."""
    if type(module).__name__ != "FrozenBatchNorm2d":
        return False
    buffers = dict(module.named_buffers(recurse=False))
    return all(name in buffers for name in _FROZEN_BN_BUFFERS)


def frozen_bn_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (C,), of a frozen batch norm: y = x * scale + shift."""
    scale = norm.weight * (norm.running_var + getattr(norm, "eps", 1e-5)).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


class FoldedFrozenBNConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that applies the frozen batch norm after it on its kernel and bias."""

    def forward(self, x: Tensor) -> Tensor:
        norm = self.__dict__["_folded_norm"]  # not a submodule: it is registered at its own place
        scale, shift = frozen_bn_affine(norm)
        weight = self.weight * scale.view(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._conv_forward(x, weight, bias)


class AbsorbedFrozenBatchNorm2d(nn.Module):
    """A frozen batch norm whose map its conv applies: the identity in the forward, its buffers
    kept (the state dict does not change)."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, folded into the conv before it"


def _absorb(conv: nn.Conv2d, norm: nn.Module) -> None:
    # Swapping the classes keeps both modules' parameters, buffers and attributes in place.
    conv.__class__ = FoldedFrozenBNConv2d
    conv.__dict__["_folded_norm"] = norm
    norm.__class__ = AbsorbedFrozenBatchNorm2d


def _pairs(parent: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        ordered = list(children.values())
        return list(zip(ordered, ordered[1:]))
    return [(child, children[f"bn{name[4:]}"]) for name, child in children.items()
            if name.startswith("conv") and f"bn{name[4:]}" in children]


def fold_frozen_batch_norms(model: nn.Module) -> int:
    """Fold every frozen batch norm fed directly by a plain conv (see the module docstring) into
    that conv, in place. Returns how many were folded."""
    folded = 0
    for parent in list(model.modules()):
        for conv, norm in _pairs(parent):
            if type(conv) is nn.Conv2d and is_frozen_batch_norm(norm) and norm.weight.shape[0] == conv.out_channels:
                _absorb(conv, norm)
                folded += 1
    return folded
