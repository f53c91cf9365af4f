"""Exports as MLflow pyfunc models: an ``MLmodel`` folder whose artifact is the export.

Input: a DataFrame with a column ``image`` of base64-encoded image bytes (JPEG or PNG); params
``score_threshold`` (float) and ``top_k`` (int). Output: one row per detection with
``image_index, label, name, score, x0, y0, x1, y1`` (+ ``rle``, a COCO RLE json string, for a
segmenter). The model is saved "from code": a two-line script that builds the model class from
this module, so loading it needs the installed package and nothing pickled. mlflow is imported
on use only (the library imports it through ``pipeline.tracking``).
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.inference.predictor import Prediction, Predictor

EXPORT_ARTIFACT = "export"  # key of the export folder among the pyfunc model's artifacts
OUTPUT_COLUMNS = ["image_index", "label", "name", "score", "x0", "y0", "x1", "y1"]
DEFAULT_PARAMS = {"score_threshold": 0.0, "top_k": 100}
_ENTRY = ("import mlflow\nfrom pipeline.inference.pyfunc import python_model\n"
          "mlflow.models.set_model(python_model())\n")


def predictions_frame(predictions: list[Prediction], with_masks: bool):
    """Predictions of a batch of images -> the output DataFrame (one row per detection)."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for index, pred in enumerate(predictions):
        rles = _rles(pred.masks) if with_masks and pred.masks is not None else None
        for k, (box, score, label) in enumerate(zip(pred.boxes.tolist(), pred.scores.tolist(),
                                                    pred.labels.tolist())):
            row = {"image_index": index, "label": int(label), "name": pred.names[k],
                   "score": float(score), **dict(zip(("x0", "y0", "x1", "y1"), map(float, box)))}
            if rles is not None:
                row["rle"] = rles[k]
            rows.append(row)
    columns = OUTPUT_COLUMNS + (["rle"] if with_masks else [])
    return pd.DataFrame(rows, columns=columns).astype(
        {"image_index": "int64", "label": "int64", "score": "float64", "x0": "float64",
         "y0": "float64", "x1": "float64", "y1": "float64"})


def _rles(masks) -> list[str]:
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
    return [json.dumps({"size": list(r["size"]), "counts": r["counts"].decode("ascii")}) for r in encoded]


def decode_frame_images(frame) -> list[bytes]:
    """The ``image`` column (base64 text or raw bytes) -> image bytes per row."""
    if "image" not in frame.columns:
        raise ValueError(f"pyfunc input needs a column 'image' of base64 image bytes, got columns "
                         f"{list(frame.columns)}")
    return [v if isinstance(v, (bytes, bytearray)) else base64.b64decode(v) for v in frame["image"]]


def python_model():
    """The pyfunc PythonModel instance (class built here: mlflow is imported on use only)."""
    from pipeline.tracking import import_mlflow

    mlflow = import_mlflow()

    class DetrforgeModel(mlflow.pyfunc.PythonModel):
        """Predictor behind MLflow's pyfunc interface (see the module docstring)."""

        def load_context(self, context):
            self.predictor = Predictor.from_export(context.artifacts[EXPORT_ARTIFACT])

        def predict(self, context, model_input, params=None):
            params = {**DEFAULT_PARAMS, **(params or {})}
            predictions = self.predictor.predict(decode_frame_images(model_input),
                                                 float(params["score_threshold"]), int(params["top_k"]))
            return predictions_frame(predictions, self.predictor.spec.kind == "segmenter")

    return DetrforgeModel()


def _example_image_b64() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 127, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def signature(with_masks: bool):
    """Input schema (image: string), output schema (the detection columns), params schema."""
    from pipeline.tracking import import_mlflow

    models = import_mlflow().models
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec("long", "image_index"), ColSpec("long", "label"), ColSpec("string", "name"),
               *(ColSpec("double", c) for c in ("score", "x0", "y0", "x1", "y1"))]
    if with_masks:
        outputs.append(ColSpec("string", "rle"))
    params = ParamSchema([ParamSpec("score_threshold", "double", 0.0),
                          ParamSpec("top_k", "long", 100)])
    return models.ModelSignature(Schema([ColSpec("string", "image")]), Schema(outputs), params)


def save_pyfunc_model(export_dir: str | Path, path: str | Path) -> Path:
    """Write the pyfunc model folder (MLmodel, the export as its artifact) of an export to path."""
    import pandas as pd

    from pipeline.inference.model_io import read_meta
    from pipeline.tracking import import_mlflow

    mlflow = import_mlflow()
    with_masks = read_meta(export_dir).get("kind") == "segmenter"
    with tempfile.TemporaryDirectory() as tmp:
        entry = Path(tmp) / "detrforge_model.py"
        entry.write_text(_ENTRY)
        mlflow.pyfunc.save_model(
            path=str(path), python_model=str(entry), artifacts={EXPORT_ARTIFACT: str(export_dir)},
            signature=signature(with_masks),
            input_example=pd.DataFrame({"image": [_example_image_b64()]}),
        )
    return Path(path)


def export_in_model_folder(model_dir: str | Path) -> Path | None:
    """The export folder inside a pyfunc model folder (from its MLmodel), or None."""
    import yaml

    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file():
        return None
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    artifact = (flavor.get("artifacts") or {}).get(EXPORT_ARTIFACT) or {}
    return Path(model_dir) / artifact["path"] if artifact.get("path") else None
