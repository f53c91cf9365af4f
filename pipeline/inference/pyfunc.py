"""Exports as MLflow pyfunc models: an ``MLmodel`` folder whose artifact is the export.

Input: a DataFrame with a column ``image`` of base64-encoded image bytes (JPEG or PNG); params
``score_threshold`` (float) and ``top_k`` (int). Output: one row per detection with
``image_index, label, name, score, x0, y0, x1, y1`` (+ ``rle``, a COCO RLE json string, for a
segmenter). The model is saved "from code": a two-line script that builds the model class from
``pipeline.inference.pyfunc_model``, so loading it needs the installed package and nothing
pickled. mlflow is imported on use only (the library imports it through ``pipeline.tracking``).
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from pipeline.export import META_FILE

EXPORT_ARTIFACT = "export"  # key of the export folder among the pyfunc model's artifacts
OUTPUT_COLUMNS = ["image_index", "label", "name", "score", "x0", "y0", "x1", "y1"]
DEFAULT_PARAMS = {"score_threshold": 0.0, "top_k": 100}
_ENTRY = ("import mlflow\nfrom pipeline.inference.pyfunc_model import python_model\n"
          "mlflow.models.set_model(python_model())\n")


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


# What loading and calling the model imports (the entry script, pyfunc_model, the detector and
# its pre/post-processing); detrforge is the package that holds ``pipeline``.
SERVING_DISTRIBUTIONS = ("detrforge", "mlflow", "torch", "torchvision", "timm", "numpy", "pillow",
                         "pandas", "safetensors", "pyyaml")


def serving_requirements() -> list[str]:
    """The model's pip requirements, pinned to the installed versions.

    Given explicitly because MLflow's inference (a subprocess that loads the model and records
    its imports) took 6 of every registration's 6.2 s and found only mlflow and cloudpickle.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # e.g. the project run from a source tree, not installed
            pins.append(name)
    return pins


def save_pyfunc_model(export_dir: str | Path, path: str | Path) -> Path:
    """Write the pyfunc model folder (MLmodel, the export as its artifact) of an export to path."""
    import pandas as pd

    from pipeline.tracking import import_mlflow

    mlflow = import_mlflow()
    with_masks = json.loads((Path(export_dir) / META_FILE).read_text()).get("kind") == "segmenter"
    with tempfile.TemporaryDirectory() as tmp:
        entry = Path(tmp) / "detrforge_model.py"
        entry.write_text(_ENTRY)
        mlflow.pyfunc.save_model(
            path=str(path), python_model=str(entry), artifacts={EXPORT_ARTIFACT: str(export_dir)},
            signature=signature(with_masks),
            input_example=pd.DataFrame({"image": [_example_image_b64()]}),
            pip_requirements=serving_requirements(),
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
