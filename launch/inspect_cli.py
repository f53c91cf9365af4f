"""`detrforge inspect MODEL IMAGE... --out DIR`: what each query of a trained model saw.

MODEL as in `predict` (export folder, run folder, models:/ URI). Writes DIR/report.html (one
self-contained file), DIR/inspect.json and the pictures under DIR/pictures/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launch.errors import CliError
from launch.workdir import default_workdir


def register(sub) -> None:
    """Add the inspect verb to the CLI's subparsers."""
    p = sub.add_parser("inspect", help="per-query report (boxes per decoder layer, sampling "
                       "points, matching costs, why an object was missed) as one HTML file")
    p.add_argument("model", help="export folder, run folder or models:/<name>@<alias>")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--annotations", help="COCO instances json of the images (matched by file "
                   "name): one row per object with its matched query, costs and a verdict")
    p.add_argument("--out", required=True, help="folder for report.html, inspect.json, pictures/")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="the score you would keep detections at (found vs low_score)")
    p.add_argument("--top-k", type=int, default=10, help="queries shown per image, by score")
    p.add_argument("--min-side", type=int, default=512, help="pictures upscaled to this longer side")
    p.add_argument("--workdir", default=default_workdir(),
                   help="workdir whose MLflow store resolves models:/ URIs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    p.set_defaults(handler=cmd_inspect)


def _items(paths: list[Path], truth: dict | None):
    from pipeline.inference.images import ImageDecodeError, load_image
    from pipeline.inspect.inspector import InspectInput

    items = []
    for path in paths:
        try:
            image = load_image(path)
            image.load()
        except (ImageDecodeError, OSError) as err:
            print(f"detrforge inspect: skipped {path}: {err}", file=sys.stderr)
            continue
        gt = truth.get(path.name) if truth is not None else None
        if truth is not None and gt is None:
            print(f"detrforge inspect: {path.name} is not in the annotations; no ground truth rows",
                  file=sys.stderr)
        items.append(InspectInput(path.name, image.convert("RGB"), gt))
    return items


def cmd_inspect(args) -> int:
    from launch.model_cli import _predictor
    from pipeline.inference.images import find_images
    from pipeline.inspect.collect import InspectConfig
    from pipeline.inspect.ground_truth import load_ground_truth
    from pipeline.inspect.inspector import REPORT_FILE, inspect_images

    try:
        cfg = InspectConfig(args.score_threshold, args.top_k, args.min_side)
    except ValueError as err:
        raise CliError(f"detrforge inspect: {err}") from None
    args.dtype = "fp32"
    predictor = _predictor(args)
    spec = predictor.spec
    truth = (load_ground_truth(args.annotations, spec.categories, spec.class_names)
             if args.annotations else None)
    items = _items(find_images(args.inputs), truth)
    if not items:
        raise CliError("detrforge inspect: no readable image among the inputs")
    summary = inspect_images(predictor.model, spec, predictor.meta, items, args.out, cfg, args.device)
    counts = ", ".join(f"{k} {v}" for k, v in summary["verdicts"].items())
    print(f"{len(items)} images inspected -> {Path(args.out) / REPORT_FILE}")
    if truth is not None:
        print(f"ground-truth objects: {counts}")
    return 0
