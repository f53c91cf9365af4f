"""Registered versions are MLflow pyfunc models: load in a fresh process, serve with the real
`mlflow models serve`, same detections as `detrforge predict`; old plain versions still resolve."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.cli import main
from pipeline.registry import RegistryError, promote, register_export, resolve_model_uri
from pipeline.tracking import mlflow_client, tracking_uri_for


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_export):
    workdir = tmp_path_factory.mktemp("reg")
    uri = tracking_uri_for(workdir)
    version = register_export(tiny_export, "tiny.detr", uri)
    promote(uri, "tiny.detr", version, "production")
    image = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), np.uint8)).save(image)
    return {"workdir": workdir, "uri": uri, "image": image}


def _frame_json(image: Path) -> str:
    b64 = base64.b64encode(image.read_bytes()).decode("ascii")
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64]]},
                       "params": {"top_k": 5}})


def _cli_predictions(registry, tmp_path) -> list[dict]:
    code = main(["predict", "models:/tiny.detr@production", str(registry["image"]), "--out",
                 str(tmp_path / "preds"), "--workdir", str(registry["workdir"]), "--top-k", "5",
                 "--score-threshold", "0"])
    assert code == 0
    return json.loads((tmp_path / "preds" / "predictions.json").read_text())


def _same(rows: list[dict], predictions: list[dict]) -> None:
    assert len(rows) == len(predictions) == 5
    for row, pred in zip(rows, predictions):
        x0, y0, w, h = pred["bbox"]
        assert row["name"] == pred["category_name"]
        np.testing.assert_allclose([row["score"], row["x0"], row["y0"], row["x1"], row["y1"]],
                                   [pred["score"], x0, y0, x0 + w, y0 + h], atol=1e-4)


def test_pyfunc_loads_in_a_fresh_process(registry, tmp_path):
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/tiny.detr@production')\n"
        "df = pd.DataFrame(json.loads(sys.stdin.read())['dataframe_split']['data'], columns=['image'])\n"
        "print(m.predict(df, params={'top_k': 5}).to_json(orient='records'))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}
    done = subprocess.run([sys.executable, "-c", code], input=_frame_json(registry["image"]),
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(rows[0]) == {"image_index", "label", "name", "score", "x0", "y0", "x1", "y1"}
    _same(rows, _cli_predictions(registry, tmp_path))


def test_old_plain_artifact_versions_still_resolve(registry, tiny_export, tmp_path):
    client = mlflow_client(registry["uri"])
    run = client.create_run(client.get_experiment_by_name("detrforge").experiment_id)
    client.log_artifacts(run.info.run_id, str(tiny_export), artifact_path="export")
    client.create_registered_model("old.detr")
    client.create_model_version("old.detr", f"{run.info.artifact_uri}/export", run_id=run.info.run_id)
    local = resolve_model_uri("models:/old.detr/1", registry["uri"], tmp_path / "old")
    assert (local / "model.safetensors").is_file()
    new = resolve_model_uri("models:/tiny.detr@production", registry["uri"], tmp_path / "new")
    assert (new / "meta.json").is_file() and (new.parent.parent / "MLmodel").is_file()


def test_a_version_names_the_packages_it_needs_pinned(registry, tmp_path):
    """MLflow's own inference listed only mlflow and cloudpickle (and cost 6 s a registration)."""
    from importlib.metadata import version

    model = resolve_model_uri("models:/tiny.detr@production", registry["uri"], tmp_path / "m").parent.parent
    requirements = (model / "requirements.txt").read_text().split()
    for name in ("torch", "timm", "mlflow", "safetensors"):
        assert f"{name}=={version(name)}" in requirements, (name, requirements)
    assert any(line.startswith("detrforge") for line in requirements)


def test_unknown_model_and_unset_alias_are_one_line_errors(registry, tmp_path, capsys):
    with pytest.raises(RegistryError, match="has no alias 'staging'"):
        resolve_model_uri("models:/tiny.detr@staging", registry["uri"], tmp_path)
    code = main(["predict", "models:/nope.detr@latest", str(registry["image"]), "--out",
                 str(tmp_path / "p"), "--workdir", str(registry["workdir"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nope.detr" in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_detrforge_predict(registry, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the server writes to it
    # mlflow starts `uvicorn` by name: the venv's bin folder must be on PATH (as when activated).
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"],
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny.detr@production",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = _frame_json(registry["image"]).encode()
        deadline, answer = time.monotonic() + 240, None
        while answer is None:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve never answered"
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                                 {"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
            except OSError:
                time.sleep(1)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        log.close()
    _same(answer["predictions"], _cli_predictions(registry, tmp_path))
