"""Inference speed: ``Predictor`` (PyTorch), the same Predictor running our ONNX export in
onnxruntime, and HF transformers' ``DeformableDetrForObjectDetection`` with its image processor
and ``post_process_object_detection``, at the same model and image sizes.

    python benchmarks/predict.py [--configs tiny r50] [--eval-size r50=320] [--rounds 5] \
        [--out benchmarks/results]

Every contender goes from uint8 images to top-100 detections (resize, normalise, pad, model,
post-processing). Weights are random (timing does not depend on them; HF's timm backbone is
built without a download). Contenders run in interleaved rounds after one warm-up call each and
medians are reported, so load changes on a shared machine hit all of them alike. CPU or CUDA for
PyTorch and HF; onnxruntime on the CPU provider. Writes ``<out>/predict.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.inference.model_io import ModelSpec, build_model
from pipeline.inference.predictor import Predictor
from pipeline.models import BackboneConfig, DetectorConfig

NUM_CLASSES = 10
# model sizes + evaluation resize; "tiny" is configs/stages/detr_pretrain/tiny.yaml, "r50" the
# paper's Deformable DETR (single-scale queries, no refinement) at COCO's 800 / 1333 resize
CONFIGS: dict[str, dict] = {
    "tiny": dict(backbone="resnet18", hidden_dim=96, enc_layers=2, dec_layers=3, num_queries=30,
                 heads=4, dim_feedforward=256, levels=4, points=4, two_stage=True, box_refine=True,
                 eval_size=128, max_size=192),
    "r50": dict(backbone="resnet50", hidden_dim=256, enc_layers=6, dec_layers=6, num_queries=300,
                heads=8, dim_feedforward=1024, levels=4, points=4, two_stage=False, box_refine=False,
                eval_size=800, max_size=1333),
}


def detector_config(spec: dict) -> DetectorConfig:
    return DetectorConfig(
        kind="deformable", num_classes=NUM_CLASSES, num_queries=spec["num_queries"],
        hidden_dim=spec["hidden_dim"], num_feature_levels=spec["levels"], enc_layers=spec["enc_layers"],
        dec_layers=spec["dec_layers"], nheads=spec["heads"], enc_n_points=spec["points"],
        dec_n_points=spec["points"], dim_feedforward=spec["dim_feedforward"], dropout=0.0,
        two_stage=spec["two_stage"], box_refine=spec["box_refine"],
        backbone=BackboneConfig(name=spec["backbone"], out_strides=[8, 16, 32]))


def ours(spec: dict, device: str, batch: int) -> Predictor:
    model_spec = ModelSpec(kind="detector", model_cfg=detector_config(spec),
                           class_names=[f"c{i}" for i in range(NUM_CLASSES)],
                           eval_size=spec["eval_size"], max_size=spec["max_size"])
    return Predictor(build_model(model_spec), model_spec, device=device, batch_size=batch)


def onnx_predictor(predictor: Predictor, folder: Path) -> tuple[Predictor, float]:
    """Our ONNX export of the same weights in onnxruntime, and the export's seconds."""
    from pipeline.inference.onnx_export import (
        OnnxExportConfig,
        OnnxPredictor,
        default_canvas,
        export_onnx,
    )

    cfg = OnnxExportConfig(canvas=default_canvas(predictor))
    start = time.perf_counter()
    path = export_onnx(predictor, folder / "model.onnx", cfg)
    return OnnxPredictor(path, predictor, cfg.canvas), time.perf_counter() - start


def hf_runner(spec: dict, device: str) -> Callable[[list[np.ndarray]], list]:
    """HF's processor + model + post-processing at the same sizes (random weights)."""
    from transformers import (
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        DeformableDetrImageProcessor,
    )

    config = DeformableDetrConfig(
        use_timm_backbone=True, backbone=spec["backbone"], use_pretrained_backbone=False,
        num_labels=NUM_CLASSES, num_queries=spec["num_queries"], d_model=spec["hidden_dim"],
        encoder_layers=spec["enc_layers"], decoder_layers=spec["dec_layers"],
        encoder_attention_heads=spec["heads"], decoder_attention_heads=spec["heads"],
        encoder_ffn_dim=spec["dim_feedforward"], decoder_ffn_dim=spec["dim_feedforward"],
        num_feature_levels=spec["levels"], encoder_n_points=spec["points"],
        decoder_n_points=spec["points"], two_stage=spec["two_stage"],
        with_box_refine=spec["box_refine"], two_stage_num_proposals=spec["num_queries"])
    model = DeformableDetrForObjectDetection(config).to(device).eval()
    processor = DeformableDetrImageProcessor(size={"shortest_edge": spec["eval_size"],
                                                   "longest_edge": spec["max_size"]})

    @torch.no_grad()
    def run(images: list[np.ndarray]) -> list:
        inputs = processor(images=images, return_tensors="pt").to(device)
        outputs = model(**inputs)
        sizes = torch.tensor([image.shape[:2] for image in images], device=device)
        return processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes,
                                                       top_k=100)
    return run


def contenders(spec: dict, device: str, batch: int, folder: Path) -> tuple[dict, dict]:
    """{name: images -> detections} and notes (export time, what was skipped and why)."""
    predictor = ours(spec, device, batch)
    runs: dict[str, Callable] = {"ours": lambda images: predictor.predict(images)}
    notes: dict = {}
    try:
        onnx, seconds = onnx_predictor(predictor, folder)
        runs["ours_onnxruntime"] = lambda images: onnx.predict(images)
        notes["onnx_export_s"] = round(seconds, 1)
    except ImportError as err:
        notes["ours_onnxruntime"] = f"skipped: {err} (pip install -e .[onnx])"
    try:
        runs["hf"] = hf_runner(spec, device)
    except ImportError as err:
        notes["hf"] = f"skipped: {err} (pip install -e .[bench])"
    return runs, notes


def interleaved(runs: dict[str, Callable], images: list[np.ndarray], rounds: int) -> dict:
    """Median ms per batch and images/s of each contender over interleaved rounds."""
    for run in runs.values():
        run(images)  # warm-up: allocator, lazy init, onnxruntime's first-run optimisations
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run(images)
            seconds[name].append(time.perf_counter() - start)
    result = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        result[name] = {"ms_per_batch": round(1000 * median, 1),
                        "ms_per_image": round(1000 * median / len(images), 1),
                        "images_per_s": round(len(images) / median, 2),
                        "ms_all_rounds": [round(1000 * v, 1) for v in values]}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--eval-size", nargs="*", default=[], metavar="CONFIG=SIDE",
                        help="shorter side of a config's images (max side scaled alike), e.g. "
                        "r50=320 on a CPU; default each config's own (tiny 128, r50 800)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    sizes = {key: int(value) for key, value in (item.split("=", 1) for item in args.eval_size)}
    rng = np.random.default_rng(0)
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "device": args.device, "batch": args.batch,
              "rounds": args.rounds, "weights": "random", "configs": {}}
    for name in args.configs:
        spec = dict(CONFIGS[name])
        if name in sizes:
            spec["max_size"] = round(spec["max_size"] * sizes[name] / spec["eval_size"])
            spec["eval_size"] = sizes[name]
        # landscape images already at the evaluation size: the resize is not what is timed
        shape = (spec["eval_size"], min(spec["max_size"], spec["eval_size"] * 4 // 3), 3)
        images = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(args.batch)]
        with tempfile.TemporaryDirectory() as folder:
            runs, notes = contenders(spec, args.device, args.batch, Path(folder))
            result = interleaved(runs, images, args.rounds)
        report["configs"][name] = {"spec": spec, "image_hw": list(shape[:2]), **notes, **result}
        print(name, json.dumps({k: v["ms_per_image"] for k, v in result.items()}), "ms/image")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predict.json").write_text(json.dumps(report, indent=2))
    print(f"-> {out / 'predict.json'}")


if __name__ == "__main__":
    main()
