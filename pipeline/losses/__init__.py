"""Losses: DETR set matching and criterion, classification losses for backbone pretraining."""

from pipeline.losses.classification import (
    ClassificationLoss,
    ClassificationLossConfig,
    build_classification_loss,
    label_smoothing_cross_entropy,
    soft_target_cross_entropy,
)
from pipeline.losses.focal import sigmoid_focal_loss
from pipeline.losses.masks import MaskLossConfig, dice_loss, mask_losses, point_sample
from pipeline.losses.matcher import HungarianMatcher, MatcherConfig
from pipeline.losses.set_criterion import (
    CriterionConfig,
    LossWeights,
    SetCriterion,
)

__all__ = [
    "ClassificationLoss",
    "ClassificationLossConfig",
    "CriterionConfig",
    "HungarianMatcher",
    "LossWeights",
    "MaskLossConfig",
    "MatcherConfig",
    "SetCriterion",
    "build_classification_loss",
    "dice_loss",
    "label_smoothing_cross_entropy",
    "mask_losses",
    "point_sample",
    "sigmoid_focal_loss",
    "soft_target_cross_entropy",
]
