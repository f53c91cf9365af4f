"""`detrforge predict / eval / export`: a trained model outside the pipeline.

MODEL is an export folder, a stage run folder or a `models:/<name>@<alias>` /
`models:/<name>/<version>` URI of the workdir's registry (or $MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from launch.errors import CliError
from launch.workdir import default_workdir
from pipeline.run_folder import META_FILE, RunFolder


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=default_workdir(),
                        help="workdir whose MLflow store resolves models:/ URIs (default: "
                             "$DETRFORGE_WORKDIR or ./runs)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))


def register(sub) -> None:
    """Add the predict, eval and export verbs to the CLI's subparsers."""
    pr = sub.add_parser("predict", help="detect objects in images with a trained model")
    pr.add_argument("model", help="export folder, run folder or models:/<name>@<alias>")
    pr.add_argument("inputs", nargs="+", help="image files or folders of images")
    pr.add_argument("--out", required=True, help="folder for predictions.json and pictures")
    pr.add_argument("--score-threshold", type=float, default=0.3)
    pr.add_argument("--top-k", type=int, default=100)
    pr.add_argument("--batch-size", type=int, default=4)
    _add_common(pr)
    pr.set_defaults(handler=cmd_predict)

    ev = sub.add_parser("eval", help="COCO evaluation of a model on a shard split or COCO json")
    ev.add_argument("model", help="export folder, run folder or models:/<name>@<alias>")
    ev.add_argument("--data", help="a shard split folder (e.g. data/samples/detect/val)")
    ev.add_argument("--annotations", help="COCO instances json (with --images)")
    ev.add_argument("--images", help="folder of the json's images (with --annotations)")
    ev.add_argument("--out", default="eval.json", help="where the metrics JSON goes")
    ev.add_argument("--mlflow", action="store_true", help="log the metrics to the model "
                    "version's run (models:/ URIs)")
    _add_common(ev)
    ev.set_defaults(handler=cmd_eval)

    ex = sub.add_parser("export", help="consolidated fp32 export of a run folder's checkpoint, "
                        "and with --onnx model.onnx checked against PyTorch")
    ex.add_argument("run_folder", metavar="MODEL", help="a stage run folder "
                    "(<workdir>/<pipeline>/<stage>); with --onnx also an export folder or a "
                    "models:/<name>@<alias> URI (with --out)")
    ex.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    ex.add_argument("--out", help="export folder (default: <run_folder>/export, or "
                                  "export_step_<N> when that holds the finished stage's export)")
    ex.add_argument("--onnx", action="store_true", help="write model.onnx and onnx_parity.json "
                    "(AP of PyTorch and onnxruntime on the validation split; exit 2 when they "
                    "differ by more than 0.005). A finished run folder's export/ is used as it is "
                    "unless --step is given. Needs the onnx extra")
    ex.add_argument("--data", help="split for the ONNX parity check (default: the model's val split)")
    ex.add_argument("--register", action="store_true", help="register the export in MLflow")
    ex.add_argument("--workdir", default=None, help="workdir of the MLflow store (default: "
                                                    "the run folder's grandparent)")
    ex.set_defaults(handler=cmd_export)


def _tracking_uri(workdir: str | Path) -> str:
    from pipeline.tracking import tracking_uri_for

    return tracking_uri_for(Path(workdir))


def _predictor(args, batch_size: int = 4):
    from pipeline.inference.predictor import Predictor
    from pipeline.model_cache import workdir_model_cache

    cache = workdir_model_cache(args.workdir)
    return Predictor.from_uri(args.model, _tracking_uri(args.workdir), cache, device=args.device,
                              dtype=args.dtype, batch_size=batch_size)


def _readable(paths: list[Path]):
    """(path, image) of each input that decodes; the others are reported on stderr and skipped."""
    from pipeline.inference.images import ImageDecodeError, load_image

    for path in paths:
        try:
            yield path, load_image(path)
        except ImageDecodeError as err:
            print(f"detrforge predict: skipped {err}", file=sys.stderr)


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from pipeline.boxes import box_xyxy_to_xywh
    from pipeline.inference.images import draw_prediction, find_images

    predictor = _predictor(args, args.batch_size)
    out = Path(args.out)
    paths = find_images(args.inputs)
    records, done = [], 0
    for index, (path, image) in enumerate(tqdm(list(_readable(paths)), desc="predict", unit="img",
                                               disable=not sys.stderr.isatty())):
        pred = predictor.predict([image], args.score_threshold, args.top_k)[0]
        ids = [int(c["id"]) for c in predictor.spec.categories] or list(range(len(predictor.class_names)))
        for box, score, label in zip(box_xyxy_to_xywh(pred.boxes).tolist(), pred.scores.tolist(),
                                     pred.labels.tolist()):
            records.append({"image_id": index, "file_name": str(path), "category_id": ids[label],
                            "category_name": predictor.class_names[label], "bbox": box,
                            "score": score})
        draw_prediction(image, pred.boxes.tolist(),
                        [f"{n} {s:.2f}" for n, s in zip(pred.names, pred.scores.tolist())],
                        out / "pictures" / f"{index:05d}_{path.stem}.png")
        done += 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(records, indent=1))
    print(f"{len(records)} detections in {done} of {len(paths)} images -> {out / 'predictions.json'}")
    return 0 if done == len(paths) else 1


def _data_config(predictor, split: Path):
    """The stage's data config (eval resize, batch size) pointed at split's shard folder, with no
    training split: a folder named ``train`` is evaluated like any other (every image once, the
    eval resize), not read as a shuffled, augmented training stream."""
    import dataclasses

    from pipeline.data.detection import DetectionDataConfig

    data = dict((predictor.meta.get("config") or {}).get("data") or {})
    fields = {f.name for f in dataclasses.fields(DetectionDataConfig)}
    data = {k: v for k, v in data.items() if k in fields}
    return DetectionDataConfig(**{**data, "shards": str(split.parent), "train_splits": []})


def _split_loader(predictor, split: Path):
    """(the stage's evaluation loader over split, its COCO annotation file)."""
    from pipeline.data.detection import build_detection_loader
    from pipeline.data.shards import load_shard_info

    annotations = load_shard_info(split).annotation_path
    if annotations is None:
        raise FileNotFoundError(f"{split} has no annotation file beside its shards; convert it "
                                "with `detrforge data coco-to-shards`")
    return build_detection_loader(_data_config(predictor, split), split.name, 0, 1), annotations


def _shard_report(predictor, split: Path) -> dict:
    """The stage's evaluation on a shard split (same loader, same batches, same numbers)."""
    from pipeline.inference.evaluate import evaluate_batches

    if predictor.spec.kind == "segmenter":
        return {"metrics": _segmenter_metrics(predictor, _data_config(predictor, split), split)}
    return evaluate_batches(predictor, *_split_loader(predictor, split))


def _segmenter_metrics(predictor, cfg, split: Path) -> dict:
    """segm AP, PQ (things/stuff), mIoU by the segmentation stage's own evaluation."""
    from pipeline.data.panoptic_view import build_segmentation_loader, load_panoptic_view
    from pipeline.data.shards import load_shard_info
    from pipeline.eval.segmentation import SegmentationEvalConfig, segmentation_evaluate
    from pipeline.inference.evaluate import Harness

    config = predictor.meta.get("config") or {}
    annotations = Path(config.get("panoptic_annotations") or split.parent / "annotations")
    view = load_panoptic_view(annotations, split.name, load_shard_info(split).categories)
    loader = build_segmentation_loader(cfg, split.name, None)
    eval_cfg = SegmentationEvalConfig(**{**predictor.spec.eval, "pictures": 0})
    evaluate = segmentation_evaluate(loader, view, load_shard_info(split).annotation_path,
                                         predictor.spec.focal, eval_cfg, None)
    return evaluate(Harness(predictor))


def cmd_eval(args) -> int:
    from pipeline.inference.evaluate import evaluate_batches, format_report, raw_coco_batches

    if bool(args.data) == bool(args.annotations and args.images):
        raise CliError("detrforge eval: give --data SPLIT, or --annotations COCO.json with --images DIR")
    predictor = _predictor(args)
    if args.data:
        report = _shard_report(predictor, Path(args.data))
    else:
        batches = raw_coco_batches(Path(args.annotations), Path(args.images), predictor, 4)
        report = evaluate_batches(predictor, batches, Path(args.annotations))
    report["model"] = str(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"-> {args.out}")
    if args.mlflow:
        _log_to_version_run(args.model, _tracking_uri(args.workdir), report["metrics"])
    return 0


def _log_to_version_run(model: str, tracking_uri: str, metrics: dict) -> None:
    from pipeline.registry import RegistryError, parse_model_uri
    from pipeline.tracking import mlflow_client

    if not str(model).startswith("models:/"):
        raise RegistryError(f"--mlflow logs to a model version's run: {model} is not a models:/ URI")
    name, version, alias = parse_model_uri(model)
    client = mlflow_client(tracking_uri)
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))
    for key, value in metrics.items():
        client.log_metric(mv.run_id, f"eval_cli/{key}", float(value))
    print(f"logged {len(metrics)} metrics to run {mv.run_id} ({name} version {mv.version})")


def _export_meta(run_folder: Path) -> dict:
    """The finished stage's meta (without its metrics), else one built from config.yaml."""
    meta_path = RunFolder(run_folder).export_meta_path
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return {k: v for k, v in meta.items() if k not in ("metrics", "weights_sha256", "format")}
    config_path = RunFolder(run_folder).config_path
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    meta = {"config": config, "stage": run_folder.name, "pipeline": run_folder.parent.name}
    model = (config or {}).get("model") or {}
    if "backbone" in model and "kind" in model:  # a detector stage
        from pipeline.data.shards import load_shard_info

        categories = load_shard_info(Path(config["data"]["shards"]) / "train").categories
        meta.update(kind="detector", detector={**model, "num_classes": len(categories)},
                    class_names=[str(c.get("name", c["id"])) for c in categories],
                    categories=categories)
    return meta


def _given_export(args) -> Path | None:
    """The export folder --onnx reads as it is (a models:/ URI, an export folder, a finished run
    folder without --step); None when a checkpoint is to be consolidated first."""
    from pipeline.inference.model_io import resolve_model
    from pipeline.model_cache import workdir_model_cache

    model = str(args.run_folder)
    if model.startswith("models:/"):
        if not args.out:
            raise CliError(f"detrforge export {model} --onnx: give --out DIR for model.onnx")
        if args.register:
            raise CliError("detrforge export: --register takes a run folder, not a models:/ URI")
        workdir = args.workdir or default_workdir()
        return resolve_model(model, _tracking_uri(workdir), workdir_model_cache(workdir))
    if (Path(model) / META_FILE).is_file():
        return Path(model)
    if args.step is None and RunFolder(Path(model)).export_meta_path.is_file():
        return RunFolder(Path(model)).export_dir
    return None


def _consolidate(args) -> Path:
    """The fp32 export of the run folder's checkpoint (--step, default latest)."""
    from pipeline.inference.consolidate import checkpoint_dir, export_checkpoint

    run_folder = Path(args.run_folder)
    directory = checkpoint_dir(run_folder, args.step)
    out = Path(args.out) if args.out else RunFolder(run_folder).export_dir
    if not args.out and (out / META_FILE).is_file():
        out = run_folder / f"export_{directory.name}"
    export = export_checkpoint(run_folder, out, _export_meta(run_folder), args.step)
    print(f"exported {directory} -> {export}")
    return export


def _write_onnx(export: Path, out: Path, data: str | None) -> dict:
    """model.onnx and onnx_parity.json in out; OnnxParityError (exit 2) past the tolerance."""
    from pipeline.inference.onnx_export import (
        ONNX_FILE,
        PARITY_FILE,
        OnnxExportConfig,
        OnnxPredictor,
        check_parity,
        default_canvas,
        export_onnx,
        parity_report,
    )
    from pipeline.inference.predictor import Predictor

    predictor = Predictor.from_export(export)
    cfg = OnnxExportConfig(canvas=default_canvas(predictor))
    path = export_onnx(predictor, out / ONNX_FILE, cfg)
    shards = ((predictor.meta.get("config") or {}).get("data") or {}).get("shards")
    if data is None and not shards:
        raise CliError(f"{export}: meta.json names no data.shards; give --data SPLIT for the parity check")
    split = Path(data) if data else Path(shards) / "val"
    onnx = OnnxPredictor(path, predictor, cfg.canvas)
    report = {"model": str(export), "onnx": str(path), "data": str(split),
              **parity_report(predictor, onnx, *_split_loader(predictor, split), cfg)}
    (out / PARITY_FILE).write_text(json.dumps(report, indent=2))
    print(f"ONNX {path}: AP pytorch {report['ap_pytorch']:.4f}, onnx {report['ap_onnx']:.4f} "
          f"(diff {report['ap_diff']:.4f}), max |d boxes| {report['boxes_max_abs_diff']:.2g}, "
          f"max |d scores| {report['scores_max_abs_diff']:.2g}, "
          f"{report['latency_ms_per_batch']['pytorch']:.1f} vs "
          f"{report['latency_ms_per_batch']['onnx']:.1f} ms/batch -> {out / PARITY_FILE}")
    check_parity(report, str(out / PARITY_FILE))
    return report


def cmd_export(args) -> int:
    export = _given_export(args) if args.onnx else None
    if export is None:
        export = _consolidate(args)
    if args.onnx:
        _write_onnx(export, Path(args.out) if args.out else export, args.data)
    if args.register:
        from pipeline.registry import register_export

        run_folder = Path(args.run_folder)
        workdir = Path(args.workdir) if args.workdir else run_folder.parent.parent
        name = f"{run_folder.parent.name}.{run_folder.name}"
        version = register_export(export, name, _tracking_uri(workdir))
        print(f"registered {name} version {version}")
    return 0
