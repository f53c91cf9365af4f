"""Detection models: timm backbones, deformable / vanilla transformers, DETR heads."""

from pipeline.models.backbone import Backbone, BackboneConfig, build_backbone
from pipeline.models.build import build_detector
from pipeline.models.detr import DETR, DeformableDETR, DetectorConfig

__all__ = [
    "DETR",
    "Backbone",
    "BackboneConfig",
    "DeformableDETR",
    "DetectorConfig",
    "build_backbone",
    "build_detector",
]
