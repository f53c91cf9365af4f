"""``Predictor``: an export + images -> boxes, scores, labels, names (and masks for a segmenter).

Post-processing is the stage evaluation's own: ``postprocess_detections`` for detectors, and
``resize_mask_logits`` + ``instance_inference`` / ``semantic_inference`` / ``panoptic_inference``
for segmenters. Nothing here re-implements top-k, box scaling or mask resizing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.boxes import box_cxcywh_to_xyxy
from pipeline.data.collate import model_images
from pipeline.eval.postprocess import postprocess_detections
from pipeline.eval.segmentation_inference import (
    PanopticInferenceConfig,
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    semantic_inference,
)
from pipeline.inference.images import ImageInput, load_image, prepare_batch
from pipeline.inference.model_io import InferenceError, ModelSpec, load_model, resolve_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Prediction:
    """What the model found in one image; pixel coordinates of the image as given."""

    boxes: Tensor  # (k, 4) fp32 x0, y0, x1, y1
    scores: Tensor  # (k,) fp32, descending
    labels: Tensor  # (k,) int64 contiguous class index
    names: list[str]  # class name of each detection
    masks: Tensor | None = None  # segmenter: (k, H, W) bool instance masks
    semantic: Tensor | None = None  # segmenter: (H, W) int64 class per pixel
    panoptic: Tensor | None = None  # segmenter: (H, W) int64 segment id, 0 = void
    segments: list[dict] = field(default_factory=list)  # segmenter: {"id", "label", "isthing", "score"}

    def keep(self, which: Tensor) -> Prediction:
        """The detections selected by a (k,) bool mask (the maps are per image, kept whole)."""
        index = which.nonzero().flatten().tolist()
        return Prediction(self.boxes[which], self.scores[which], self.labels[which],
                          [self.names[i] for i in index],
                          None if self.masks is None else self.masks[which],
                          self.semantic, self.panoptic, self.segments)


class Predictor:
    """A model rebuilt from its export, ready to predict on images of any size.

    ``Predictor.from_export("runs/demo/detr/export")`` or
    ``Predictor.from_uri("models:/demo.detr@production", tracking_uri)``, then
    ``predictor.predict(["a.jpg", pil_image, uint8_array], score_threshold=0.3)``.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, meta: dict | None = None,
                 device: str | torch.device = "cpu", dtype: str = "fp32", batch_size: int = 4):
        if dtype not in DTYPES:
            raise InferenceError(f"Predictor: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise InferenceError(f"Predictor: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec, self.meta = spec, meta or {}
        self.dtype, self.batch_size = DTYPES[dtype], batch_size

    @classmethod
    def from_export(cls, path: str | Path, **kwargs) -> Predictor:
        """From an export folder (or a run folder holding export/)."""
        model, spec, meta = load_model(resolve_model(path, None, "."))
        return cls(model, spec, meta, **kwargs)

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None,
                 **kwargs) -> Predictor:
        """From a models:/ URI (downloaded once per version into cache_dir; without one into a
        temporary folder removed once the model is loaded), an export folder or a run folder."""
        import tempfile

        with contextlib.ExitStack() as stack:
            cache = cache_dir if cache_dir is not None else stack.enter_context(
                tempfile.TemporaryDirectory(prefix="detrforge-"))
            model, spec, meta = load_model(resolve_model(uri, tracking_uri, cache))
        return cls(model, spec, meta, **kwargs)

    @property
    def class_names(self) -> list[str]:
        return self.spec.class_names

    def autocast(self):
        """bf16 autocast when asked for, else nothing (fp32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def forward(self, images: Tensor, padding_mask: Tensor) -> dict:
        """The model's raw outputs on a padded (B, 3, H, W) uint8 batch, fp32 on the CPU
        (pred_logits, pred_boxes, and pred_masks for a segmenter)."""
        inputs = model_images({"images": images, "padding_mask": padding_mask}, self.device, torch.float32)
        with self.autocast():
            out = self.model(inputs, padding_mask.to(self.device))
        keys = ("pred_logits", "pred_boxes", "pred_masks")
        return {k: out[k].float().cpu() for k in keys if k in out}

    def predict(self, images: Sequence[ImageInput] | ImageInput, score_threshold: float = 0.0,
                top_k: int = 100) -> list[Prediction]:
        """One Prediction per image (paths, PIL images, uint8 arrays or bytes; mixed sizes),
        in batches of ``batch_size`` padded to the largest image."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pictures = [load_image(item) for item in images]
        results: list[Prediction] = []
        for start in range(0, len(pictures), self.batch_size):
            batch = prepare_batch(pictures[start:start + self.batch_size], self.spec.eval_size,
                                  self.spec.max_size, self.spec.size_divisibility)
            results += self.predict_batch(batch, top_k)
        return [p.keep(p.scores >= score_threshold) for p in results]

    def predict_batch(self, batch: dict, top_k: int = 100) -> list[Prediction]:
        """A batch from ``prepare_batch`` (or a loader: "images", "padding_mask", "sizes",
        "orig_sizes") -> Predictions at the original sizes."""
        return self.postprocess(self.forward(batch["images"], batch["padding_mask"]), batch, top_k)

    def postprocess(self, outputs: dict, batch: dict, top_k: int = 100) -> list[Prediction]:
        """Raw outputs of ``forward`` on ``batch`` -> Predictions at the original sizes (the one
        post-processing every backend shares: PyTorch here, onnxruntime in onnx_export)."""
        if self.spec.kind == "segmenter":
            return self._segment(outputs, batch, top_k)
        detections = postprocess_detections(outputs, batch["orig_sizes"], self.spec.focal, top_k)
        return [self._prediction(d["boxes"], d["scores"], d["labels"]) for d in detections]

    def _prediction(self, boxes: Tensor, scores: Tensor, labels: Tensor, **extra) -> Prediction:
        names = [self.class_names[int(label)] for label in labels]
        return Prediction(boxes.float(), scores.float(), labels.long(), names, **extra)

    def _segment(self, outputs: dict, batch: dict, top_k: int) -> list[Prediction]:
        cfg = PanopticInferenceConfig(float(self.spec.eval.get("object_mask_threshold", 0.8)),
                                      float(self.spec.eval.get("overlap_threshold", 0.8)))
        is_thing = [bool(c.get("isthing", 1)) for c in self.spec.categories] or [True] * len(self.class_names)
        canvas = batch["images"].shape[-2:]
        results = []
        for i, logits in enumerate(outputs["pred_logits"]):
            masks = resize_mask_logits(outputs["pred_masks"][i], canvas, batch["sizes"][i],
                                       batch["orig_sizes"][i])
            height, width = (float(v) for v in batch["orig_sizes"][i])
            # the box head's boxes: one segmenter export detects as well as it segments
            query_boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"][i].float()) * torch.tensor(
                [width, height, width, height])
            inst = instance_inference(logits, masks, self.spec.focal, top_k, query_boxes=query_boxes)
            ids, segments = panoptic_inference(logits, masks, self.spec.focal, is_thing, cfg)
            results.append(self._prediction(inst["boxes"], inst["scores"], inst["labels"],
                                            masks=inst["masks"], panoptic=ids, segments=segments,
                                            semantic=semantic_inference(logits, masks, self.spec.focal)))
        return results
