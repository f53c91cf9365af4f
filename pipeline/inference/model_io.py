"""An export (model.safetensors + meta.json) -> the model and what inference needs to run it.

Nothing but the export is read: the architecture comes from ``meta["detector"]`` or
``meta["segmenter"]``, the evaluation resize and post-processing settings from the stage config
saved in ``meta["config"]``, the class names from ``meta["class_names"]``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.export import META_FILE, WEIGHTS_FILE, ExportError, load_export
from pipeline.models import DetectorConfig, build_detector
from pipeline.models.mask_head import SegmenterConfig, build_segmenter
from pipeline.run_folder import RunFolder

MODEL_KINDS = ("detector", "segmenter")


class InferenceError(RuntimeError):
    """A model cannot be found, rebuilt or run; the message names the input and the fix."""


@dataclass
class ModelSpec:
    """What an export says about running its model."""

    kind: str  # "detector" | "segmenter"
    model_cfg: DetectorConfig | SegmenterConfig  # architecture (backbone weights unset)
    class_names: list[str]  # name of each contiguous label
    categories: list[dict] = field(default_factory=list)  # dataset categories in label order
    eval_size: int = 800  # shorter side of the evaluation resize
    max_size: int = 1333  # longer side limit of the evaluation resize
    size_divisibility: int = 1  # batches padded to a multiple of this
    focal: bool = True  # sigmoid class scores (Deformable) vs softmax with no-object (DETR)
    eval: dict[str, Any] = field(default_factory=dict)  # the stage's eval section (top_k, thresholds)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise InferenceError(f"meta.json: kind must be one of {MODEL_KINDS}, got {self.kind!r}")

    @property
    def detector_cfg(self) -> DetectorConfig:
        return self.model_cfg.detector if self.kind == "segmenter" else self.model_cfg


def _without_weights(detector: dict) -> dict:
    # The backbone's start weights were a training input; the export holds every weight.
    backbone = {**detector.get("backbone", {}), "weights": None, "pretrained": False}
    return {**detector, "backbone": backbone}


def spec_from_meta(meta: dict, where: str = META_FILE) -> ModelSpec:
    """The ModelSpec of an export's meta.json (InferenceError naming the missing key)."""
    kind = meta.get("kind")
    if kind not in MODEL_KINDS or kind not in meta:
        raise InferenceError(f"{where}: needs kind 'detector' or 'segmenter' and its architecture "
                             f"under that key (got kind={kind!r}); export the model with a "
                             "detection or segmentation stage")
    if "class_names" not in meta:
        raise InferenceError(f"{where}: has no class_names; re-export the model")
    config = meta.get("config") or {}
    data = config.get("data") or {}
    if kind == "detector":
        model_cfg = DetectorConfig(**_without_weights(meta["detector"]))
        focal = model_cfg.focal  # sigmoid head for deformable and dino, softmax for detr
    else:
        seg = dict(meta["segmenter"])
        model_cfg = SegmenterConfig(detector=DetectorConfig(**_without_weights(seg["detector"])),
                                    mask_head=seg.get("mask_head", {}),
                                    mask_attention=seg.get("mask_attention", "none"),
                                    # exports from before the switch were trained without it
                                    unified_query_selection=seg.get("unified_query_selection", False))
        focal = bool(((config.get("criterion") or {}).get("matcher") or {}).get("focal", True))
    return ModelSpec(kind=kind, model_cfg=model_cfg, class_names=[str(n) for n in meta["class_names"]],
                     categories=list(meta.get("categories") or []),
                     eval_size=int(data.get("eval_size", 800)), max_size=int(data.get("max_size", 1333)),
                     size_divisibility=int(data.get("size_divisibility", 1)), focal=focal,
                     eval=dict(config.get("eval") or {}))


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model of the spec's architecture (load the export's weights next)."""
    cfg = dataclasses.replace(spec.model_cfg)
    return build_detector(cfg) if spec.kind == "detector" else build_segmenter(cfg)


def load_model(export_dir: str | Path) -> tuple[nn.Module, ModelSpec, dict]:
    """(model in eval mode with every export weight loaded, spec, meta) of an export folder."""
    export_dir = Path(export_dir)
    if not (export_dir / META_FILE).is_file():
        raise InferenceError(f"{export_dir}: missing {META_FILE}; point at a stage's export/ folder "
                             "(or its run folder, or a models:/ URI)")
    try:
        state_dict, meta = load_export(export_dir)
    except ExportError as err:
        raise InferenceError(str(err)) from None
    spec = spec_from_meta(meta, str(export_dir / META_FILE))
    model = build_model(spec)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise InferenceError(f"{export_dir / WEIGHTS_FILE}: does not fit the architecture of its "
                             f"{META_FILE} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), spec, meta


def read_meta(export_dir: str | Path) -> dict:
    """meta.json of an export folder."""
    return json.loads((Path(export_dir) / META_FILE).read_text())


def resolve_model(model: str | Path, tracking_uri: str | None, cache_dir: str | Path) -> Path:
    """The export folder behind MODEL: an export folder, a stage run folder (its export/), or a
    ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` URI (downloaded once per version
    under cache_dir and reused: `pipeline.model_cache`)."""
    text = str(model)
    if text.startswith("models:/"):
        if tracking_uri is None:
            raise InferenceError(f"{text}: a models:/ URI needs a tracking URI (--workdir or "
                                 "$MLFLOW_TRACKING_URI)")
        from pipeline.model_cache import cached_model

        return cached_model(text, tracking_uri, cache_dir)
    path = Path(text)
    if not path.exists():
        raise InferenceError(f"{path}: no such export folder, run folder or models:/ URI")
    if path.is_file():
        path = path.parent
    if (path / META_FILE).is_file():
        return path
    if RunFolder(path).export_meta_path.is_file():
        return RunFolder(path).export_dir
    raise InferenceError(f"{path}: missing {META_FILE}; not an export folder (nor a run folder "
                         "with export/). Finish the stage, or run `detrforge export RUN_FOLDER`")
