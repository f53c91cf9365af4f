"""The segmentation stage's library pieces, which live in ``pipeline/``: the panoptic view and
its loader (``pipeline.data.panoptic_view``), evaluation (``pipeline.eval.segmentation``).
Re-exported here for callers written against the old location; import them from ``pipeline``.
"""

from pipeline.data.panoptic_view import PanopticView, build_segmentation_loader, load_panoptic_view
from pipeline.eval.segmentation import SegmentationEvalConfig, segmentation_evaluate

__all__ = ["PanopticView", "SegmentationEvalConfig", "build_segmentation_loader", "load_panoptic_view",
           "segmentation_evaluate"]
