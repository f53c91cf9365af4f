"""The segment_finetune model section `detrforge finetune --task segment` writes."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.finetune_recipe import RecipeError, segmenter_section
from pipeline.models import DetectorConfig


@pytest.mark.parametrize("kind", ["deformable", "dino"])
def test_multi_scale_detectors_take_a_mask_head(kind):
    detector = dataclasses.asdict(DetectorConfig(kind=kind, two_stage=True))
    model = segmenter_section(detector, "models:/demo.detr@production")
    assert model["detector"]["kind"] == kind
    assert model["mask_head"]["mask_dim"] == detector["hidden_dim"]


def test_a_single_scale_detector_is_refused_naming_the_kinds_that_work():
    detector = dataclasses.asdict(DetectorConfig(kind="detr"))
    with pytest.raises(RecipeError, match=r"of models:/x@y cannot take a mask head .*"
                                          r"start from a Deformable DETR or DINO export"):
        segmenter_section(detector, "models:/x@y")
