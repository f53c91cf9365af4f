"""Instance, semantic and panoptic inference from hand-set class and mask logits."""

import pytest
import torch

from pipeline.eval.segmentation_inference import (
    PanopticInferenceConfig,
    instance_inference,
    panoptic_inference,
    panoptic_segments,
    resize_mask_logits,
    semantic_inference,
)

BIG = 20.0  # a logit whose sigmoid is 1 for all purposes


def region(rows: slice, cols: slice, size=(4, 6)) -> torch.Tensor:
    """Mask logits: +BIG inside the region, -BIG elsewhere."""
    logits = torch.full(size, -BIG)
    logits[rows, cols] = BIG
    return logits


def softmax_logits(labels: list[int], num_classes: int, confident=True) -> torch.Tensor:
    """(Q, C + 1) logits putting almost all mass on each query's label (num_classes = no-object)."""
    logits = torch.zeros(len(labels), num_classes + 1)
    logits[torch.arange(len(labels)), labels] = BIG if confident else 0.0
    return logits


def test_semantic_inference_takes_the_class_of_the_covering_query():
    masks = torch.stack([region(slice(None), slice(0, 3)), region(slice(None), slice(3, 6))])
    semantic = semantic_inference(softmax_logits([2, 0], 3), masks, focal=False)
    assert semantic[:, :3].eq(2).all() and semantic[:, 3:].eq(0).all()


def test_panoptic_separates_things_and_merges_stuff_of_one_class():
    masks = torch.stack([
        region(slice(0, 2), slice(0, 3)),  # thing class 0
        region(slice(0, 2), slice(3, 6)),  # thing class 0, another instance
        region(slice(2, 3), slice(None)),  # stuff class 1
        region(slice(3, 4), slice(None)),  # stuff class 1 again: same segment
    ])
    ids, segments = panoptic_inference(softmax_logits([0, 0, 1, 1], 2), masks, focal=False,
                                       is_thing=[True, False])
    assert [(s["label"], s["isthing"]) for s in segments] == [(0, True), (0, True), (1, False)]
    assert ids[0, 0] != ids[0, 5] and ids[2, 0] == ids[3, 0] == segments[2]["id"]
    assert (ids > 0).all()


def test_panoptic_drops_unsure_queries_and_hidden_segments():
    masks = torch.stack([
        region(slice(None), slice(None)),  # confident, covers everything
        region(slice(0, 2), slice(0, 2)),  # confident but weaker: loses every pixel it wants
        region(slice(0, 2), slice(0, 6)),  # unsure class: dropped by object_mask_threshold
    ])
    logits = softmax_logits([0, 1, 1], 2)
    logits[1, 1] = 5.0  # softmax ~0.98 < the first query's ~1.0
    logits[2] = 0.0  # uniform over 3 entries: 0.33 < 0.8
    ids, segments = panoptic_inference(logits, masks, focal=False, is_thing=[True, True])
    assert [s["label"] for s in segments] == [0]
    assert ids.eq(1).all()


def test_panoptic_overlap_threshold_keeps_a_mostly_visible_segment():
    masks = torch.stack([region(slice(None), slice(0, 4)), region(slice(None), slice(3, 6))])
    logits = softmax_logits([0, 1], 2)
    logits[1, 1] = 8.0  # query 1 loses the shared column: 2 of its 3 columns stay visible
    cfg = PanopticInferenceConfig(overlap_threshold=0.6)
    _, segments = panoptic_inference(logits, masks, focal=False, is_thing=[True, True], cfg=cfg)
    assert len(segments) == 2
    cfg = PanopticInferenceConfig(overlap_threshold=0.7)
    _, segments = panoptic_inference(logits, masks, focal=False, is_thing=[True, True], cfg=cfg)
    assert len(segments) == 1


def test_panoptic_with_no_confident_query_is_all_void():
    ids, segments = panoptic_inference(torch.zeros(3, 3), torch.zeros(3, 4, 4), focal=False, is_thing=[True, True])
    assert segments == [] and ids.eq(0).all()


def test_instance_inference_ranks_by_class_times_mask_score():
    masks = torch.stack([region(slice(0, 2), slice(0, 2)), torch.full((4, 6), 0.2)])  # vague mask
    masks[1, 0, 0] = BIG
    logits = torch.tensor([[2.0, -9.0], [2.5, -9.0]])  # focal: query 1 has the higher class score
    result = instance_inference(logits, masks, focal=True, top_k=2)
    assert result["queries"].tolist() == [0, 1]  # query 0's sharp mask wins
    assert result["masks"][0].sum() == 4
    assert result["boxes"][0].tolist() == pytest.approx([0, 0, 2, 2])


def test_resize_mask_logits_crops_the_padding_first():
    logits = torch.full((1, 4, 4), -1.0)
    logits[:, :2, :2] = 1.0  # the unpadded image is the top-left quarter of the canvas
    out = resize_mask_logits(logits, canvas_size=(8, 8), image_size=(4, 4), out_size=(2, 2))
    assert out.shape == (1, 2, 2) and out.min() > 0  # no padding pixel leaked in
    uncropped = resize_mask_logits(logits, canvas_size=(8, 8), image_size=(8, 8), out_size=(2, 2))
    assert uncropped.min() < 0


def test_panoptic_counts_the_contested_pixels_and_gives_them_to_the_higher_score():
    masks = torch.stack([
        region(slice(0, 3), slice(0, 4)),  # 12 pixels
        region(slice(1, 4), slice(2, 6)),  # 12 pixels, 4 of them (rows 1-2, cols 2-3) shared
        region(slice(0, 4), slice(0, 6)),  # unsure class: dropped, so its overlaps do not count
    ])
    logits = softmax_logits([0, 1, 1], 2)
    logits[1, 1] = 8.0  # a little less sure than query 0
    logits[2] = 0.0
    result = panoptic_segments(logits, masks, focal=False, is_thing=[True, True],
                               cfg=PanopticInferenceConfig(overlap_threshold=0.5))
    assert result.contested_pixels == 4
    first = [s["id"] for s in result.segments if s["label"] == 0][0]
    assert (result.ids[1:3, 2:4] == first).all()
    ids, segments = panoptic_inference(logits, masks, focal=False, is_thing=[True, True],
                                       cfg=PanopticInferenceConfig(overlap_threshold=0.5))
    assert torch.equal(ids, result.ids) and segments == result.segments


def test_instance_boxes_come_from_the_box_head_when_given():
    masks = torch.stack([region(slice(0, 2), slice(0, 3)), region(slice(2, 4), slice(3, 6))])
    query_boxes = torch.tensor([[0.0, 0.0, 3.5, 2.5], [3.0, 2.0, 6.0, 4.0]])
    out = instance_inference(softmax_logits([0, 1], 2), masks, focal=False, top_k=2, query_boxes=query_boxes)
    torch.testing.assert_close(out["boxes"], query_boxes[out["queries"]])
    expected_mask_boxes = torch.tensor([[0.0, 0.0, 3.0, 2.0], [3.0, 2.0, 6.0, 4.0]])
    torch.testing.assert_close(out["mask_boxes"], expected_mask_boxes[out["queries"]])
    without = instance_inference(softmax_logits([0, 1], 2), masks, focal=False, top_k=2)
    torch.testing.assert_close(without["boxes"], without["mask_boxes"])
