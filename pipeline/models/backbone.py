"""Multi-scale backbones from any timm model, through ``features_only`` and ``feature_info``.

Channels and strides are read from timm's ``feature_info``, never hard-coded. Family details:

- Swin returns channels-last maps (timm ``output_fmt`` NHWC): converted to NCHW here.
- Models with a patch embedding (Swin, ViT) are built with ``strict_img_size=False`` /
  ``dynamic_img_size=True`` and the image is zero-padded bottom/right to a multiple of the
  largest stride inside ``forward``; the maps are cropped back to ``ceil(side / stride)`` so
  every backbone gives the same map sizes for the same image.
- ViT has a single stride-16 map: a simple feature pyramid (ViTDet) makes strides 4/8/16/32
  from it (transposed convs up, max-pool down).

The extra stride-64 level of Deformable DETR (its 4th scale) is not made here: as in the
official code it is a stride-2 conv in the detector's input projection
(``pipeline/models/deformable_transformer.py``), so backbone weights stay pure timm weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.backbone_weights import load_backbone_weights, normalize_key
from pipeline.models.frozen_bn_fold import fold_frozen_batch_norms

VIT_PYRAMID_STRIDES = (4, 8, 16, 32)


@dataclass
class BackboneConfig:
    """Which timm model gives the detector its feature maps, and how it trains."""

    name: str = "resnet50"  # any timm model name that supports features_only
    out_strides: list[int] = field(default_factory=lambda: [8, 16, 32])  # strides of maps returned, ascending
    frozen_bn: bool = True  # replace BatchNorm2d by FrozenBatchNorm2d (statistics and affine fixed)
    frozen_stages: int = 0  # freeze the first N feature_info stages (stem included in the first); 0 = none
    freeze_steps: int = 0  # the training step keeps the whole backbone frozen for the first K steps
    weights: str | None = None  # local .safetensors/.pth (timm classifier or stage-1 export) or None
    # timm's published weights for ``name`` (ImageNet-1k/22k), downloaded from the Hugging Face Hub
    # into its cache on first use; a local ``weights`` file wins (nothing downloaded then).
    pretrained: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (e.g. depths)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("BackboneConfig.name must be a timm model name, e.g. 'resnet50'")
        if not self.out_strides or list(self.out_strides) != sorted(set(self.out_strides)):
            raise ValueError(
                f"BackboneConfig.out_strides must be a non-empty ascending list, got {self.out_strides}"
            )
        if any(s < 1 or s & (s - 1) for s in self.out_strides):
            raise ValueError(f"BackboneConfig.out_strides must be powers of two, got {self.out_strides}")
        if self.frozen_stages < 0 or self.freeze_steps < 0:
            raise ValueError("BackboneConfig.frozen_stages and freeze_steps must be >= 0")


class BackboneBuildError(ValueError):
    """The timm model cannot give the requested feature maps."""


class PretrainedWeightsUnavailable(BackboneBuildError):
    """``pretrained: true`` but timm's weights are neither cached nor downloadable here."""


def _unavailable(cfg: BackboneConfig, error: Exception) -> PretrainedWeightsUnavailable:
    from huggingface_hub import constants

    why = ("HF_HUB_OFFLINE=1 and they are not in the local cache" if constants.HF_HUB_OFFLINE
           else f"the download failed ({type(error).__name__})")
    return PretrainedWeightsUnavailable(
        f"pipeline/models/backbone.py: backbone.pretrained: timm's weights for {cfg.name!r} are not "
        f"available: {why}; go online (HF_HUB_OFFLINE unset) to download them once, or set "
        f"backbone.weights: <local .safetensors/.pth> instead"
    )


def create_timm_features(cfg: BackboneConfig) -> nn.Module:
    """timm ``features_only`` model for ``cfg``: timm's published weights with ``pretrained``
    (and no local ``weights``), else random init (weights then come from local files)."""
    import timm  # imported here: timm imports torchvision, which the position/ops code never needs

    kwargs = dict(cfg.model_kwargs)
    if _is_vit_like(cfg.name):
        kwargs.setdefault("dynamic_img_size", True)
        kwargs.setdefault("out_indices", 1)  # the last block only: the pyramid is built from it
    elif "swin" in cfg.name:
        kwargs.setdefault("strict_img_size", False)
    download = cfg.pretrained and not cfg.weights
    try:
        return timm.create_model(cfg.name, pretrained=download, features_only=True, **kwargs)
    except OSError as error:  # the Hub's "not cached / cannot connect" errors are OSErrors
        if download:
            raise _unavailable(cfg, error) from None
        raise
    except (RuntimeError, AssertionError) as error:  # timm's errors for unknown names / indices
        raise BackboneBuildError(f"pipeline/models/backbone.py: timm cannot build {cfg.name!r}: {error}") from error


def _is_vit_like(name: str) -> bool:
    return name.startswith(("vit_", "deit", "eva", "beit"))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet pyramid: one (B, C, H, W) stride-16 map -> maps at ``strides`` (subset of 4/8/16/32)."""

    def __init__(self, channels: int, strides: list[int]):
        super().__init__()
        self.strides = list(strides)
        self.scales = nn.ModuleList(self._scale(channels, s) for s in self.strides)
        self.channels = [self._channels(channels, s) for s in self.strides]

    @staticmethod
    def _channels(channels: int, stride: int) -> int:
        return {4: channels // 4, 8: channels // 2, 16: channels, 32: channels}[stride]

    @staticmethod
    def _scale(channels: int, stride: int) -> nn.Module:
        if stride == 4:
            return nn.Sequential(
                nn.ConvTranspose2d(channels, channels // 2, 2, stride=2),
                nn.GELU(),
                nn.ConvTranspose2d(channels // 2, channels // 4, 2, stride=2),
            )
        if stride == 8:
            return nn.ConvTranspose2d(channels, channels // 2, 2, stride=2)
        if stride == 16:
            return nn.Identity()
        return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, feature: Tensor) -> list[Tensor]:
        return [scale(feature) for scale in self.scales]


class Backbone(nn.Module):
    """timm features -> list of (B, C_l, H_l, W_l) maps at ``strides``, H_l = ceil(H / stride).

    Attributes: ``num_channels`` and ``strides`` (lists, one per returned map), ``body`` (the timm
    ``features_only`` model; its parameters are the ones that take pretrained weights),
    ``pyramid`` (ViT only).
    """

    def __init__(self, cfg: BackboneConfig, body: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.body = body if body is not None else create_timm_features(cfg)
        info = self.body.feature_info
        self._body_strides = list(info.reduction())
        self._channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self._pad_multiple = max(self._body_strides) if needs_padding(self.body, self._body_strides) else 1
        self._frozen = False
        self.pyramid: SimpleFeaturePyramid | None = None
        if len(set(self._body_strides)) == 1 and cfg.out_strides != self._body_strides[-1:]:
            self._setup_pyramid(info.channels()[-1], self._body_strides[-1])
        else:
            self._select = self._select_levels(info)
        if cfg.frozen_bn:
            from timm.layers import freeze_batch_norm_2d

            self.body = freeze_batch_norm_2d(self.body)
            fold_frozen_batch_norms(self.body)  # the same function, fewer element-wise passes
        freeze_first_stages(self.body, info.module_name(), cfg.frozen_stages)

    def _setup_pyramid(self, channels: int, stride: int) -> None:
        if stride != 16 or not set(self.cfg.out_strides) <= set(VIT_PYRAMID_STRIDES):
            raise BackboneBuildError(
                f"pipeline/models/backbone.py: {self.cfg.name} has a single stride-{stride} map; the "
                f"feature pyramid supports out_strides within {VIT_PYRAMID_STRIDES} from stride 16, "
                f"got {self.cfg.out_strides}"
            )
        self._select = [len(self._body_strides) - 1]
        self.pyramid = SimpleFeaturePyramid(channels, self.cfg.out_strides)
        self.num_channels = self.pyramid.channels
        self.strides = list(self.cfg.out_strides)

    def _select_levels(self, info: Any) -> list[int]:
        select = []
        for stride in self.cfg.out_strides:
            if stride not in self._body_strides:
                raise BackboneBuildError(
                    f"pipeline/models/backbone.py: {self.cfg.name} has feature strides "
                    f"{self._body_strides}; out_strides {self.cfg.out_strides} must be among them"
                )
            select.append(len(self._body_strides) - 1 - self._body_strides[::-1].index(stride))
        self.num_channels = [info.channels()[i] for i in select]
        self.strides = list(self.cfg.out_strides)
        return select

    def param_group(self, name: str) -> str:
        """Optimiser group of parameter ``name`` (relative to this module): "backbone" for the
        body, which takes pretrained weights; "default" for layers initialised here (the ViT
        pyramid), which must learn at the full lr."""
        return "backbone" if name.startswith("body.") else "default"

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (True) or release the whole backbone; the training step calls it for freeze_steps.

        While frozen, the forward runs without autograd (no gradients, no activation memory) and
        normalisation layers use their running statistics. Parameters keep ``requires_grad``, so
        an optimiser built once still owns them after release.
        """
        self._frozen = frozen
        self.train(self.training)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self._frozen:
            self.body.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> list of (B, C_l, ceil(H / s_l), ceil(W / s_l))."""
        height, width = images.shape[-2:]
        if self._pad_multiple > 1:
            multiple = self._pad_multiple
            images = F.pad(images, (0, (-width) % multiple, 0, (-height) % multiple))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen):
            features = self.body(images)
        features = [features[i] for i in self._select]
        if self._channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]
        if self.pyramid is not None:
            features = self.pyramid(features[-1])
        return [
            f[..., : math.ceil(height / s), : math.ceil(width / s)].contiguous()
            for f, s in zip(features, self.strides)
        ]


def _inner(body: nn.Module) -> nn.Module:
    """The wrapped timm model of a FeatureGetterNet (ViT), else the features model itself."""
    return getattr(body, "model", body)


def needs_padding(body: nn.Module, strides: list[int]) -> bool:
    """Whether inputs must be padded to a multiple of the largest stride to give maps of
    ceil(side / stride): patch embeddings (Swin, ViT) need it, and so do patchify stems
    (ConvNeXt) that floor odd sizes. Convolutional stems with padding (ResNet) are probed and
    left unpadded, so their outputs match the reference implementations exactly."""
    if hasattr(_inner(body), "patch_embed"):
        return True
    side = max(strides) + 1
    was_training = body.training
    body.eval()
    with torch.no_grad():
        features = body(torch.zeros(1, 3, side, side))
    body.train(was_training)
    return any(f.shape[-1] != math.ceil(side / s) for f, s in zip(features, strides))


def freeze_first_stages(body: nn.Module, stage_modules: list[str], num_stages: int) -> None:
    """Set requires_grad=False on all parameters up to the end of stage ``num_stages``.

    Modules are visited in registration order, which for timm models is forward order, so the
    stem is frozen with the first stage.
    """
    if num_stages == 0:
        return
    if num_stages > len(stage_modules):
        raise BackboneBuildError(
            f"pipeline/models/backbone.py: frozen_stages={num_stages} but the model has "
            f"{len(stage_modules)} stages ({stage_modules})"
        )
    stage = normalize_key(stage_modules[num_stages - 1])
    names = [normalize_key(n).removeprefix("model.") for n, _ in body.named_modules()]
    if stage not in names:
        raise BackboneBuildError(
            f"pipeline/models/backbone.py: stage module {stage_modules[num_stages - 1]!r} not found"
        )
    last = max(i for i, n in enumerate(names) if n == stage or n.startswith(stage + "."))
    for index, (_, module) in enumerate(body.named_modules()):
        if index > last:
            break
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Backbone for ``cfg``, with ``cfg.weights`` loaded (report printed) when set."""
    backbone = Backbone(cfg)
    if cfg.weights:
        report = load_backbone_weights(backbone, cfg.weights)
        print(report.summary())
    return backbone
