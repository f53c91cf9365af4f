"""The pyfunc model MLflow loads (``mlflow.pyfunc.load_model``, ``mlflow models serve``): a
Predictor behind the pyfunc interface described in ``pipeline.inference.pyfunc``.

Kept apart from the saving side (``pyfunc``, which the registry imports) so that the registry never
imports the Predictor: model_io resolves models:/ URIs through the registry.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from pipeline.inference.predictor import Prediction, Predictor
from pipeline.inference.pyfunc import DEFAULT_PARAMS, EXPORT_ARTIFACT, OUTPUT_COLUMNS


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
