"""``inspect_images``: images (and their ground truth) through a model -> a folder with
``inspect.json`` (everything the report shows), the pictures (PNG) and ``report.html``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.inspect.collect import InspectConfig, inspect_outputs, matcher_for, run_image
from pipeline.inspect.draw import overview_picture, query_picture
from pipeline.inspect.ground_truth import GroundTruth
from pipeline.inspect.report import write_report
from pipeline.inspect.verdicts import count_verdicts

JSON_FILE, REPORT_FILE, PICTURES_DIR = "inspect.json", "report.html", "pictures"


@dataclass
class InspectInput:
    """One image to inspect."""

    name: str  # shown in the report and used for picture names
    image: Image.Image  # the image as given (any size)
    ground_truth: GroundTruth | None = None  # its annotated objects, if any


def _picture_name(index: int, name: str, what: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40]
    return f"{index:03d}_{stem}_{what}.png"


def _save(picture: Image.Image, folder: Path, name: str) -> str:
    picture.save(folder / name)
    return f"{PICTURES_DIR}/{name}"


def inspect_one(model, spec, matcher, item: InspectInput, index: int, cfg: InspectConfig,
                folder: Path, device: torch.device) -> dict:
    """One image's record with the paths of its pictures ("overview", and per query "picture")."""
    outputs, raw = run_image(model, spec, item.image, device)
    record = {"name": item.name, "width": item.image.width, "height": item.image.height,
              **inspect_outputs(outputs, raw, item.ground_truth, matcher, spec.class_names, cfg,
                                item.image.size)}
    record["verdicts"] = count_verdicts(record["ground_truth"])
    record["overview"] = _save(overview_picture(item.image, record, cfg.min_side, cfg.top_k), folder,
                               _picture_name(index, item.name, "overview"))
    for query in record["queries"]:
        mask = outputs.masks[query["query"]] if outputs.masks is not None else None
        query["picture"] = _save(query_picture(item.image, query, record, cfg.min_side, mask), folder,
                                 _picture_name(index, item.name, f"q{query['query']}"))
    return record


def inspect_images(model, spec, meta: dict, items: list[InspectInput], out_dir: str | Path,
                   cfg: InspectConfig | None = None, device: str | torch.device = "cpu") -> dict:
    """Inspect ``items`` with ``model`` (eval mode; ``spec`` a ``ModelSpec``, ``meta`` its export
    meta: the matcher's weights come from its recipe) -> the summary written to inspect.json
    {"model", "score_threshold", "verdicts" (counts over all images), "images": [records]}."""
    cfg = cfg or InspectConfig()
    out_dir = Path(out_dir)
    folder = out_dir / PICTURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model = model.to(device).eval()
    matcher = matcher_for(meta, spec.focal)
    records = [inspect_one(model, spec, matcher, item, i, cfg, folder, device)
               for i, item in enumerate(items)]
    summary = {"model": {"kind": spec.kind, "detector": spec.detector_cfg.kind,
                         "classes": spec.class_names, "focal": spec.focal},
               "score_threshold": cfg.score_threshold, "top_k": cfg.top_k,
               "verdicts": count_verdicts([row for r in records for row in r["ground_truth"]]),
               "images": records}
    (out_dir / JSON_FILE).write_text(json.dumps(summary))
    write_report(summary, out_dir, out_dir / REPORT_FILE)
    return summary
