"""On a real tiny stage run (the `trained` fixture, `detrforge run` of the tiny recipe): the
README's "Using a trained model" commands, and `eval` giving exactly the stage's DONE.json.
The run and its evaluations took 4.5 minutes on 2 busy cores: slow-marked (run them with
`-m slow`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.cli import main
from pipeline.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]


def test_the_tiny_recipe_reads_the_checkout_samples():
    from pipeline.config import load_config
    from stages import detr_pretrain

    cfg = load_config(str(ROOT / "configs" / "stages" / "detr_pretrain" / "tiny.yaml"),
                      detr_pretrain.Config, [], ignore_keys=("stage",))
    assert Path(cfg.data.shards).resolve() == ROOT / "data" / "samples" / "detect"


@pytest.mark.slow
def test_eval_of_the_registered_version_equals_done_json(trained, tmp_path):
    out = tmp_path / "eval.json"
    code = main(["eval", f"models:/{trained['name']}@latest", "--data", str(trained["val"]),
                 "--out", str(out), "--workdir", str(trained["workdir"])])
    assert code == 0
    done = trained["done"]["metrics"]
    assert any(value > 0 for value in done.values())  # 20 steps: equality is not 0 == 0
    assert json.loads(out.read_text())["metrics"] == done


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "some_image.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 120, 3), np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_predict_latest_then_promote_and_the_python_api_agree(trained, image, tmp_path):
    workdir = str(trained["workdir"])
    assert main(["predict", f"models:/{trained['name']}@latest", str(image), "--out",
                 str(tmp_path / "preds"), "--workdir", workdir, "--score-threshold", "0"]) == 0
    records = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    assert main(["registry", "promote", trained["name"], "1", "production", "--workdir", workdir]) == 0
    predictor = Predictor.from_uri(f"models:/{trained['name']}@production", trained["tracking_uri"])
    (pred,) = predictor.predict([str(image)], score_threshold=0.0)
    assert len(records) == len(pred.scores) > 0
    np.testing.assert_allclose([r["score"] for r in records], pred.scores.numpy(), atol=1e-6)
    assert [r["category_name"] for r in records] == pred.names


@pytest.mark.slow
def test_onnx_export_of_a_finished_run_folder(trained):
    assert main(["export", str(trained["run_dir"]), "--onnx"]) == 0
    report = json.loads((trained["export"] / "onnx_parity.json").read_text())
    assert (trained["export"] / "model.onnx").is_file() and report["ap_diff"] <= 0.005
    assert report["ap_pytorch"] > 0 or report["metrics"]["pytorch"]["AR100"] > 0
