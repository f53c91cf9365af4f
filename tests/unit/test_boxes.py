"""Box conversions, area, IoU, generalized IoU and masks_to_boxes against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    generalized_box_iou,
    masks_to_boxes,
)


def test_conversions_by_hand():
    cxcywh = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    assert box_cxcywh_to_xyxy(cxcywh).tolist()[0] == pytest.approx([0.4, 0.1, 0.6, 0.7])
    assert box_xyxy_to_cxcywh(torch.tensor([[0.4, 0.1, 0.6, 0.7]])).tolist()[0] == pytest.approx([0.5, 0.4, 0.2, 0.6])
    assert box_xywh_to_xyxy(torch.tensor([[10.0, 20.0, 5.0, 8.0]])).tolist() == [[10.0, 20.0, 15.0, 28.0]]
    assert box_xyxy_to_xywh(torch.tensor([[10.0, 20.0, 15.0, 28.0]])).tolist() == [[10.0, 20.0, 5.0, 8.0]]


def test_conversions_keep_leading_dimensions_and_empty():
    boxes = torch.rand(2, 3, 4)
    assert box_cxcywh_to_xyxy(boxes).shape == (2, 3, 4)
    assert box_xyxy_to_xywh(torch.zeros(0, 4)).shape == (0, 4)


box_values = st.lists(st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=4, max_size=4)


@settings(max_examples=60, deadline=None)
@given(box_values)
def test_round_trips(values):
    box = torch.tensor([values])
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(box)), box, atol=1e-6)
    assert torch.allclose(box_xyxy_to_xywh(box_xywh_to_xyxy(box)), box, atol=1e-6)


def test_area_is_never_negative():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [2.0, 2.0, 1.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    assert box_area(boxes).tolist() == [6.0, 0.0, 0.0]


def test_iou_and_union_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    iou, union = box_iou(a, b)
    assert iou.shape == (1, 4)
    assert iou[0].tolist() == pytest.approx([1 / 7, 1.0, 0.0, 0.5])
    assert union[0].tolist() == pytest.approx([7.0, 4.0, 5.0, 4.0])


def test_generalized_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 2.0]])
    giou = generalized_box_iou(a, b)
    # hulls: 3x3 = 9 with union 7; identical; 4x2 = 8 with union 6 and no overlap
    assert giou[0].tolist() == pytest.approx([1 / 7 - 2 / 9, 1.0, -2 / 8])


def test_generalized_iou_of_empty_sets_and_degenerate_boxes():
    assert generalized_box_iou(torch.zeros(0, 4), torch.rand(3, 4)).shape == (0, 3)
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    value = generalized_box_iou(point, point)
    assert torch.isfinite(value).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(box_values, min_size=1, max_size=4), st.lists(box_values, min_size=1, max_size=4))
def test_generalized_iou_bounds_and_symmetry(first, second):
    a = box_cxcywh_to_xyxy(torch.tensor(first))
    b = box_cxcywh_to_xyxy(torch.tensor(second))
    giou = generalized_box_iou(a, b)
    assert bool(((giou >= -1 - 1e-5) & (giou <= 1 + 1e-5)).all())
    assert torch.allclose(giou, generalized_box_iou(b, a).T, atol=1e-6)
    iou, _ = box_iou(a, b)
    assert bool((giou <= iou + 1e-6).all())


def test_masks_to_boxes_by_hand():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4
    masks[1, 4, 0] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]]
    assert masks_to_boxes(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 4)
