"""Predictor: same detections as the stage evaluation's loader + post-processing, any input
kind and size, segmenter masks, and one clear error per bad input."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.collate import model_images
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.shards import load_shard_info
from pipeline.eval.postprocess import postprocess_detections
from pipeline.inference.images import ImageDecodeError
from pipeline.inference.model_io import InferenceError
from pipeline.inference.predictor import Predictor


def _val_jpegs(split) -> list[bytes]:
    """The split's images in shard order (the evaluation loader's order with one worker)."""
    images = []
    for shard in load_shard_info(split).shard_paths:
        with tarfile.open(shard) as tar:
            images += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return images


def test_predictor_equals_the_stage_evaluation_path(tiny_export, samples):
    predictor = Predictor.from_export(tiny_export, batch_size=3)
    cfg = DetectionDataConfig(shards=str(samples / "detect"), eval_size=64, max_size=96,
                              batch_size=3, num_workers=0)
    stage_detections = []
    for batch in build_detection_loader(cfg, "val"):  # what coco_evaluate does with a batch
        images = model_images(batch, "cpu", torch.float32)
        with torch.no_grad():
            outputs = predictor.model(images, batch["padding_mask"])
        orig = torch.stack([t["orig_size"] for t in batch["targets"]])
        stage_detections += postprocess_detections(outputs, orig, focal=True, top_k=100)
    predictions = predictor.predict(_val_jpegs(samples / "detect" / "val"))
    assert len(predictions) == len(stage_detections) == 10
    for pred, ref in zip(predictions, stage_detections):
        torch.testing.assert_close(pred.boxes, ref["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(pred.scores, ref["scores"], rtol=0, atol=1e-6)
        assert torch.equal(pred.labels, ref["labels"])


def test_mixed_sizes_and_input_kinds(tiny_export, tmp_path):
    rng = np.random.default_rng(0)
    wide, tall = rng.integers(0, 255, (60, 150, 3), np.uint8), rng.integers(0, 255, (130, 40, 3), np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    predictor = Predictor.from_export(tiny_export)
    by_kind = [predictor.predict(item, top_k=20)[0]
               for item in (tmp_path / "wide.png", Image.fromarray(wide), wide, (tmp_path / "wide.png").read_bytes())]
    for other in by_kind[1:]:
        assert torch.equal(other.boxes, by_kind[0].boxes) and torch.equal(other.scores, by_kind[0].scores)
    both = predictor.predict([wide, tall], top_k=20)
    for pred, (h, w) in zip(both, [(60, 150), (130, 40)]):
        assert len(pred.scores) == 20 and pred.names[0] in predictor.class_names
        assert pred.boxes[:, 0::2].min() >= -1 and pred.boxes[:, 0::2].max() <= w + 1
        assert pred.boxes[:, 1::2].min() >= -1 and pred.boxes[:, 1::2].max() <= h + 1
    # Padding to the batch canvas moves the scores little: the padding mask hides it.
    torch.testing.assert_close(both[0].scores, by_kind[0].scores, atol=0.05, rtol=0)
    kept = predictor.predict(wide, score_threshold=float(by_kind[0].scores[4]))[0]
    assert len(kept.scores) == 5


def test_segmenter_gives_masks_and_maps_at_the_original_size(tmp_path, make_export):
    export = make_export(tmp_path / "seg", segmenter=True)
    predictor = Predictor.from_export(export)
    pred = predictor.predict(np.zeros((50, 70, 3), np.uint8), top_k=7)[0]
    assert pred.masks.shape == (7, 50, 70) and pred.masks.dtype == torch.bool
    assert pred.semantic.shape == (50, 70) and pred.panoptic.shape == (50, 70)
    assert pred.boxes.shape == (7, 4)


def test_bad_inputs_get_one_clear_error(tiny_export, tmp_path):
    with pytest.raises(InferenceError, match="missing meta.json"):
        Predictor.from_export(tmp_path)
    with pytest.raises(InferenceError, match="no such export folder"):
        Predictor.from_export(tmp_path / "nope")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="broken.jpg: not a decodable image"):
        Predictor.from_export(tiny_export).predict(tmp_path / "broken.jpg")
    with pytest.raises(ImageDecodeError, match="uint8"):
        Predictor.from_export(tiny_export).predict(np.zeros((4, 4, 3), np.float32))
