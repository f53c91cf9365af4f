"""ONNX export of a detector and the parity check that proves it: COCO AP of PyTorch and of
onnxruntime on the same batches, through the Predictor's one post-processing.

The graph takes uint8 images and the padding mask (normalisation is inside it) and returns the
raw ``pred_logits`` / ``pred_boxes``. It is traced (``torch.onnx.export(dynamo=False)``): the
multi-scale deformable attention splits its value map by the feature sizes as Python ints, which
``torch.export`` cannot follow (data-dependent ``spatial_shapes.tolist()``), while the tracer
records them as constants. So the batch is dynamic and the image canvas is fixed: every batch is
padded to ``canvas`` (by default max_size x max_size, the largest evaluation resize), which the
padding mask makes invisible to the model's box coordinates (normalised to the valid image).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.transforms import normalize_images
from pipeline.eval.coco import CocoEvaluator
from pipeline.inference.evaluate import label_to_category_id, with_sizes
from pipeline.inference.model_io import InferenceError
from pipeline.inference.predictor import Predictor

ONNX_FILE = "model.onnx"
PARITY_FILE = "onnx_parity.json"
INPUT_NAMES = ("images", "padding_mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
MIN_OPSET = 17  # LayerNormalization and GridSample (deformable attention) as single ops


class OnnxParityError(InferenceError):
    """The ONNX model's AP differs from PyTorch's by more than the tolerance."""


@dataclass
class OnnxExportConfig:
    """How the graph is traced and checked."""

    opset: int = 17  # ONNX opset (>= 17)
    canvas: tuple[int, int] | None = None  # (H, W) every batch is padded to; None: max_size square
    trace_batch: int = 2  # batch size of the tracing example (the batch axis stays dynamic)
    max_ap_diff: float = 0.005  # |AP(onnx) - AP(pytorch)| allowed by the parity check

    def __post_init__(self) -> None:
        if self.opset < MIN_OPSET:
            raise InferenceError(f"onnx export: opset must be >= {MIN_OPSET}, got {self.opset}")
        if self.trace_batch < 1 or self.max_ap_diff < 0:
            raise InferenceError("onnx export: trace_batch must be >= 1 and max_ap_diff >= 0")


def default_canvas(predictor: Predictor) -> tuple[int, int]:
    """max_size x max_size rounded up to the size divisibility: room for any evaluation resize."""
    div = max(1, predictor.spec.size_divisibility)
    side = -(-predictor.spec.max_size // div) * div
    return side, side


def pad_to_canvas(images: Tensor, padding_mask: Tensor, canvas: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, 3, h, w) uint8 + (B, h, w) bool -> (B, 3, H, W) + (B, H, W), padding on the bottom/right."""
    h, w = images.shape[-2:]
    if h > canvas[0] or w > canvas[1]:
        raise InferenceError(f"onnx: a {h}x{w} batch does not fit the exported {canvas[0]}x{canvas[1]} "
                             "canvas; export again with a larger canvas")
    pad = (0, canvas[1] - w, 0, canvas[0] - h)
    return F.pad(images, pad), F.pad(padding_mask, pad, value=True)


class _Graph(nn.Module):
    """What is exported: uint8 images + padding mask -> (pred_logits, pred_boxes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(normalize_images(images, padding_mask), padding_mask)
        return out["pred_logits"], out["pred_boxes"]


def export_onnx(predictor: Predictor, path: str | Path, cfg: OnnxExportConfig) -> Path:
    """Write the predictor's detector as ONNX at ``path`` (dynamic batch, fixed canvas)."""
    if predictor.spec.kind != "detector":
        raise InferenceError("onnx export: only detectors are exported (segmenter masks are not "
                             "in the ONNX graph yet); export a detection stage's model")
    canvas = cfg.canvas or default_canvas(predictor)
    images = torch.zeros(cfg.trace_batch, 3, *canvas, dtype=torch.uint8)
    mask = torch.zeros(cfg.trace_batch, *canvas, dtype=torch.bool)
    mask[-1, :, canvas[1] // 2:] = True  # a padded example so no mask branch is traced away
    batch_axis = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _Graph(predictor.model).to("cpu").float().eval()
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about every Python int it freezes: the feature sizes, on purpose
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (images, mask), str(path), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=batch_axis,
                          opset_version=cfg.opset, dynamo=False)
    predictor.model.to(predictor.device)
    return path


class OnnxPredictor(Predictor):
    """A Predictor whose forward runs an exported model.onnx in onnxruntime (CPU); everything
    else (resize, batching, post-processing) is the Predictor's."""

    def __init__(self, onnx_path: str | Path, reference: Predictor, canvas: tuple[int, int],
                 threads: int = 0):
        import onnxruntime as ort

        # no super().__init__: it would move the reference's model (maybe on a GPU) to the CPU
        self.model, self.spec, self.meta = reference.model, reference.spec, reference.meta
        self.device, self.dtype, self.batch_size = torch.device("cpu"), torch.float32, reference.batch_size

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.canvas = canvas

    def forward(self, images: Tensor, padding_mask: Tensor) -> dict:
        """Raw outputs on a padded uint8 batch, as ``Predictor.forward`` returns them."""
        images, padding_mask = pad_to_canvas(images, padding_mask, self.canvas)
        feeds = {"images": images.numpy(), "padding_mask": padding_mask.numpy()}
        outputs = self.session.run(list(OUTPUT_NAMES), feeds)
        return {name: torch.from_numpy(np.asarray(value)) for name, value in zip(OUTPUT_NAMES, outputs)}


def _scores(logits: Tensor, focal: bool) -> Tensor:
    """Class probabilities as the post-processing ranks them."""
    return logits.sigmoid() if focal else logits.softmax(-1)[..., :-1]


@dataclass
class _Tally:
    """Per-output max |difference| and where it first exceeded the tolerance."""

    max_diff: dict
    first_divergence: dict | None = None

    def add(self, index: int, ours: dict, theirs: dict, tolerance: float) -> None:
        for name, value in ours.items():
            diff = float((value - theirs[name]).abs().max()) if value.numel() else 0.0
            self.max_diff[name] = max(self.max_diff.get(name, 0.0), diff)
            if self.first_divergence is None and diff > tolerance:
                self.first_divergence = {"batch": index, "output": name, "max_abs_diff": diff}


def parity_report(predictor: Predictor, onnx: OnnxPredictor, batches, annotation_file,
                  cfg: OnnxExportConfig, tolerance: float = 1e-3) -> dict:
    """Evaluate both backends on the same loader batches (padded to the ONNX canvas) with the
    same post-processing; the report ``onnx_parity.json`` holds. Raises nothing on divergence:
    ``check_parity`` decides."""
    top_k = int(predictor.spec.eval.get("top_k", 100))
    ids = label_to_category_id(predictor)
    evaluators = {"pytorch": CocoEvaluator(annotation_file, ids), "onnx": CocoEvaluator(annotation_file, ids)}
    seconds = {"pytorch": [], "onnx": []}
    tally, score_diff, images = _Tally({}), 0.0, 0
    for index, batch in enumerate(batches):
        batch = with_sizes(batch)
        pixels, mask = pad_to_canvas(batch["images"], batch["padding_mask"], onnx.canvas)
        batch = {**batch, "images": pixels, "padding_mask": mask}
        outputs = {}
        for name, backend in (("pytorch", predictor), ("onnx", onnx)):
            start = time.perf_counter()
            outputs[name] = backend.forward(pixels, mask)
            seconds[name].append(time.perf_counter() - start)
            predictions = predictor.postprocess(outputs[name], batch, top_k)
            evaluators[name].update([int(t["image_id"]) for t in batch["targets"]],
                                    [{"boxes": p.boxes, "scores": p.scores, "labels": p.labels}
                                     for p in predictions])
        tally.add(index, outputs["onnx"], outputs["pytorch"], tolerance)
        score_diff = max(score_diff, float((_scores(outputs["onnx"]["pred_logits"], predictor.spec.focal)
                                            - _scores(outputs["pytorch"]["pred_logits"], predictor.spec.focal)).abs().max()))
        images += len(pixels)
    metrics = {name: evaluator.summarize() for name, evaluator in evaluators.items()}
    return {
        "ap_pytorch": metrics["pytorch"]["AP"], "ap_onnx": metrics["onnx"]["AP"],
        "ap_diff": abs(metrics["onnx"]["AP"] - metrics["pytorch"]["AP"]), "max_ap_diff": cfg.max_ap_diff,
        "boxes_max_abs_diff": tally.max_diff.get("pred_boxes", 0.0), "scores_max_abs_diff": score_diff,
        "outputs_max_abs_diff": tally.max_diff, "first_divergence": tally.first_divergence,
        "latency_ms_per_batch": {name: 1000 * float(np.median(s)) for name, s in seconds.items()},
        "images": images, "batches": len(seconds["onnx"]), "canvas": list(onnx.canvas),
        "opset": cfg.opset, "metrics": metrics,
    }


def check_parity(report: dict, where: str) -> None:
    """OnnxParityError naming the first diverging output when the AP gap is over tolerance."""
    if report["ap_diff"] <= report["max_ap_diff"]:
        return
    first = report["first_divergence"] or {}
    worst = max(report["outputs_max_abs_diff"].items(), key=lambda kv: kv[1], default=("-", 0.0))
    raise OnnxParityError(
        f"{where}: ONNX AP {report['ap_onnx']:.4f} vs PyTorch {report['ap_pytorch']:.4f} differs by "
        f"{report['ap_diff']:.4f} > {report['max_ap_diff']}; outputs diverge first at "
        f"{first.get('output', worst[0])} (batch {first.get('batch', '?')}, max abs diff "
        f"{first.get('max_abs_diff', worst[1]):.3g}); largest difference {worst[0]} {worst[1]:.3g}")
