"""``build_detector``: the one place that maps ``DetectorConfig.kind`` to a detector class.

It lives apart from ``detr.py`` because ``dino.py`` extends the Deformable-DETR defined there; a
builder inside ``detr.py`` would have to import ``dino.py`` back (an import circle).
"""

from __future__ import annotations

from pipeline.models.backbone import Backbone, build_backbone
from pipeline.models.detr import DETR, DeformableDETR, DetectorConfig
from pipeline.models.dino import DINO


def build_detector(cfg: DetectorConfig, backbone: Backbone | None = None) -> DeformableDETR | DETR:
    """Detector for ``cfg``; ``backbone`` defaults to ``build_backbone(cfg.backbone)``."""
    backbone = backbone if backbone is not None else build_backbone(cfg.backbone)
    if cfg.kind == "dino":
        return DINO(cfg, backbone)
    if cfg.kind == "deformable":
        return DeformableDETR(cfg, backbone)
    return DETR(cfg, backbone)
