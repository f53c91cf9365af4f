"""Every CLI verb's handler runs (not only --help) against a temporary workdir, through
``launch.cli.main``: it succeeds, or fails with exactly one ``detrforge: error:`` line and exit
code 2. An exception that is not a user error propagates out of ``main`` and fails the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from launch.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DEMO = CONFIGS / "pipelines" / "demo.yaml"
TINY_DETR = CONFIGS / "stages" / "detr_pretrain" / "tiny.yaml"
# Verbs tested elsewhere: the model verbs by their own module's tests; `demo` trains for minutes
# (its runner is the `run` below, the integration test runs a pipeline end to end); `finetune`
# trains, so tests/integration/test_finetune.py runs its handler.
# Handlers run by their own tests: tests/inference (eval, export, predict), the integration
# tests of finetune, sweep and inspect (README commands), the demo by `make demo`.
TESTED_ELSEWHERE = {"eval", "export", "predict", "demo", "finetune", "sweep", "inspect"}


def leaf_commands(parser=None, prefix=()) -> list[tuple[str, ...]]:
    parser = parser or build_parser()
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not subs:
        return [prefix]
    return [path for action in subs for name, sub in action.choices.items()
            for path in leaf_commands(sub, (*prefix, name))]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def assert_one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("detrforge: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


COVERED: set[tuple[str, ...]] = set()


def covers(*command: str):
    """Marks a test as running the handler of ``command``."""
    COVERED.add(command)
    return lambda test: test


def test_every_verb_has_a_handler_test():
    missing = [" ".join(p) for p in leaf_commands()
               if p not in COVERED and p[0] not in TESTED_ELSEWHERE]
    assert not missing, f"verbs whose handler no test runs: {', '.join(missing)}"


# --- registry -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_workdir(tmp_path_factory) -> Path:
    """A workdir whose MLflow store holds demo.detr version 1 (a tiny fake export)."""
    from pipeline.registry import register_model
    from pipeline.tracking import TrackingConfig, build_tracker

    workdir = tmp_path_factory.mktemp("runs")
    export = workdir / "fake_export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights")
    (export / "meta.json").write_text(json.dumps({"kind": "fake"}))
    tracker = build_tracker(TrackingConfig(finish_timeout_s=10.0), workdir, 0, "stage")
    assert register_model(tracker, export, "demo.detr") == 1
    tracker.finish()
    return workdir


@covers("registry", "list")
def test_registry_list_empty_and_with_a_model(tmp_path, registry_workdir, capsys):
    code, out, _ = run_cli(capsys, "registry", "list", "--workdir", tmp_path / "empty")
    assert code == 0 and "no registered models" in out
    assert not (tmp_path / "empty").exists()  # listing creates no store

    code, out, _ = run_cli(capsys, "registry", "list", "--workdir", registry_workdir)
    assert code == 0
    row = [line for line in out.splitlines() if line.startswith("demo.detr")]
    assert len(row) == 1 and row[0].split()[1] == "1" and "latest" in row[0]


@covers("registry", "promote")
def test_registry_promote_then_list_and_errors(registry_workdir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "registry", "promote", "demo.detr", "1", "production",
                           "--workdir", registry_workdir)
    assert code == 0 and "demo.detr@production -> version 1" in out
    _, out, _ = run_cli(capsys, "registry", "list", "--workdir", registry_workdir)
    assert "production" in out

    assert_one_line_error(run_cli(capsys, "registry", "promote", "demo.detr", "7", "production",
                                  "--workdir", registry_workdir), "version 7")
    assert_one_line_error(run_cli(capsys, "registry", "promote", "nope", "1", "production",
                                  "--workdir", registry_workdir), "'nope'")
    assert_one_line_error(run_cli(capsys, "registry", "promote", "demo.detr", "one", "x",
                                  "--workdir", registry_workdir), "'one'")
    assert_one_line_error(run_cli(capsys, "registry", "promote", "demo.detr", "1", "x",
                                  "--workdir", tmp_path / "none"), "no MLflow store")


@covers("ui")
def test_ui_starts_the_light_viewer_on_the_workdir_store(tmp_path, monkeypatch, capsys):
    import pipeline.tracking.viewer as viewer_module
    from pipeline.tracking import TrackingConfig, build_tracker

    started = []

    class FakeViewer:
        """Stands for the MLflow server process (tests/integration/test_mlflow_ui.py runs it)."""

        def __init__(self, workdir, host, port):
            started.append((Path(workdir), host, port))
            self.url, self.process = f"http://{host}:{port}", self
            self.stopped = False

        def wait_ready(self):
            return 0.5

        def wait(self):
            return 0

        def stop(self):
            self.stopped = True

        training_links = viewer_module.Viewer.training_links

    monkeypatch.setattr(viewer_module, "Viewer", FakeViewer)
    tracker = build_tracker(TrackingConfig(experiment="mine", finish_timeout_s=10.0), tmp_path, 0,
                            "stage")
    tracker.finish()
    code, out, _ = run_cli(capsys, "ui", "--workdir", tmp_path, "--port", "5999")
    assert code == 0 and "ready at http://127.0.0.1:5999" in out
    # The link opens the experiment's runs in the model-training view, not MLflow's GenAI mode.
    assert "  mine: http://127.0.0.1:5999/#/experiments/" in out
    assert "/runs?workflowType=machine_learning" in out
    assert started == [(tmp_path, "127.0.0.1", 5999)]


@covers("registry", "register")
def test_registry_register_a_finished_stage_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pipeline.run_folder import RunFolder

    folder = RunFolder(tmp_path / "runs" / "pipe" / "detr").create()
    assert_one_line_error(run_cli(capsys, "registry", "register", folder.root), "not finished")
    folder.export_weights_path.write_bytes(b"weights")
    folder.export_meta_path.write_text(json.dumps({"pipeline": "pipe", "stage": "detr"}))
    folder.done_path.write_text(json.dumps({
        "stage": "detr", "config_hash": "abc", "inputs": {}, "metrics": {"AP": 0.5},
        "main_metric": "AP", "mlflow_run_id": None, "model_version": None,
        "registered_model": None}))
    code, out, _ = run_cli(capsys, "registry", "register", folder.root)
    assert code == 0 and "pipe.detr version 1" in out
    code, out, _ = run_cli(capsys, "registry", "register", folder.root)
    assert code == 0 and "already registered" in out


# --- pipelines ------------------------------------------------------------------------------


@covers("status")
def test_status_of_a_pipeline_with_nothing_run(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "status", DEMO, "--workdir", tmp_path)
    assert code == 0
    for stage in ("backbone", "detr", "domain", "segment"):
        assert any(line.split()[:3] == [stage, "not", "started"] for line in out.splitlines())
    assert_one_line_error(run_cli(capsys, "status", tmp_path / "missing.yaml"), "missing.yaml")


@covers("cancel")
def test_cancel_without_jobs(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "cancel", DEMO, "--workdir", tmp_path)
    assert code == 0 and "nothing queued or running" in out


@covers("submit")
def test_submit_with_a_bad_cluster_file(tmp_path, capsys):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("time_min: 0\n")
    assert_one_line_error(run_cli(capsys, "submit", DEMO, "--cluster", cluster,
                                  "--workdir", tmp_path), "time_min")


@covers("run")
def test_run_with_a_bad_override_is_one_line(tmp_path, capsys):
    result = run_cli(capsys, "run", TINY_DETR, "--workdir", tmp_path, "train.max_stesp=3")
    assert_one_line_error(result, "train.max_stesp", "did you mean 'train.max_steps'")
    assert_one_line_error(run_cli(capsys, "run", TINY_DETR, "optim.lr=nan", "--workdir",
                                  tmp_path), "optim.lr", "finite")
    assert not (tmp_path / "tiny").exists()  # nothing started


@covers("config", "show")
def test_config_show_with_overrides_before_and_after_options(capsys):
    code, out, _ = run_cli(capsys, "config", "show", TINY_DETR, "train.max_steps=7",
                           "init_from=null", "optim.lr=2e-4")
    assert code == 0
    assert "max_steps: 7" in out and "init_from: null" in out and "lr: 0.0002" in out


def test_overrides_after_options_reach_the_handler(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("launch.runner.run_target",
                        lambda target, overrides, workdir, **kw: seen.update(o=overrides) or 0)
    assert main(["run", str(TINY_DETR), "a.b=1", "--workdir", str(tmp_path), "c.d=2",
                 "--force", "e.f=3"]) == 0
    assert seen["o"] == ["a.b=1", "c.d=2", "e.f=3"]  # in the order given: the last one wins


def test_a_stray_token_is_still_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["status", str(DEMO), "--workdir", str(tmp_path), "train.max_steps=3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: train.max_steps=3" in capsys.readouterr().err


# --- data -----------------------------------------------------------------------------------


def _tiny_coco(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (32, 24), (90, 120, 30)).save(folder / "images" / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8],
                             "area": 80, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (folder / "ann.json").write_text(json.dumps(coco))
    return folder / "ann.json"


@covers("data", "make-samples")
def test_data_make_samples_tiny(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "data", "make-samples", tmp_path / "s", "--size", "tiny",
                           "--workers", "1")
    assert code == 0 and "sample sets written" in out
    assert (tmp_path / "s" / "detect" / "val" / "_info.json").is_file()


@covers("data", "coco-to-shards")
def test_data_coco_to_shards(tmp_path, capsys):
    ann = _tiny_coco(tmp_path)
    code, out, _ = run_cli(capsys, "data", "coco-to-shards", "--images", tmp_path / "images",
                           "--annotations", ann, tmp_path / "out", "--workers", "1",
                           "--no-progress")
    assert code == 0 and "wrote 1 images" in out
    assert_one_line_error(run_cli(capsys, "data", "coco-to-shards", "--images", tmp_path,
                                  "--annotations", tmp_path / "nope.json", tmp_path / "o2",
                                  "--no-progress"), "nope.json")


@covers("data", "imagefolder-to-shards")
def test_data_imagefolder_to_shards(tmp_path, capsys):
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(tmp_path / "src" / cls / "a.jpg")
    code, out, _ = run_cli(capsys, "data", "imagefolder-to-shards", tmp_path / "src",
                           tmp_path / "out", "--workers", "1", "--no-progress")
    assert code == 0 and (tmp_path / "out" / "_info.json").is_file()
    assert_one_line_error(run_cli(capsys, "data", "imagefolder-to-shards", tmp_path / "none",
                                  tmp_path / "o2", "--no-progress"), "none")


@covers("data", "check")
def test_data_check(tmp_path, capsys):
    ann = _tiny_coco(tmp_path)
    code, _, _ = run_cli(capsys, "data", "check", ann, "--images", tmp_path / "images")
    assert code == 0
    assert_one_line_error(run_cli(capsys, "data", "check", tmp_path / "nope.json", "--images",
                                  tmp_path))


@covers("data", "yolo-to-coco")
@covers("data", "voc-to-coco")
def test_data_yolo_and_voc_errors_are_one_line(tmp_path, capsys):
    # Their conversions are tested with the converters; here the handlers' error path.
    for verb in ("yolo-to-coco", "voc-to-coco"):
        assert_one_line_error(run_cli(capsys, "data", verb, tmp_path, "--out", tmp_path / "x.json"))


# --- paths: the same answer from any folder --------------------------------------------------


def test_shipped_recipes_read_the_sample_data_relative_to_themselves():
    from launch.graph import load_pipeline

    stage = load_pipeline(DEMO).stage("backbone")
    assert Path(stage.cfg.data.shards) == ROOT / "data" / "samples" / "classify"


def _finished_stage(tmp_path: Path) -> tuple[Path, Path]:
    """A pipeline file whose recipe names its data relatively, and a workdir where its one stage
    is done (DONE.json with the config hash and inputs the launcher computes)."""
    from launch.graph import load_pipeline, stage_inputs

    (tmp_path / "data" / "classify" / "train").mkdir(parents=True)
    (tmp_path / "data" / "classify" / "train" / "_info.json").write_text('{"shards": []}')
    (tmp_path / "cfg").mkdir()
    backbone = CONFIGS / "stages" / "backbone_pretrain" / "tiny.yaml"
    (tmp_path / "cfg" / "recipe.yaml").write_text(
        f"base: {backbone}\ndata:\n  shards: ../data/classify\n")
    pipe = tmp_path / "cfg" / "pipe.yaml"
    pipe.write_text("name: pipe\nstages:\n  - name: backbone\n    recipe: recipe.yaml\n")
    workdir = tmp_path / "runs"
    pipeline = load_pipeline(pipe)
    spec = pipeline.stage("backbone")
    assert spec.cfg.data.shards == str(tmp_path / "data" / "classify")
    run_dir = pipeline.run_dir(workdir, "backbone")
    run_dir.mkdir(parents=True)
    import torch

    from pipeline.export import write_export

    write_export(run_dir / "export", {"w": torch.zeros(1)}, {})  # a done stage has its export
    (run_dir / "DONE.json").write_text(json.dumps(
        {"config_hash": spec.config_hash, "inputs": stage_inputs(pipeline, spec, workdir)}))
    return pipe, workdir


def _status(pipe: Path, workdir: Path, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "detrforge"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([str(exe), "status", str(pipe), "--workdir", str(workdir)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


def test_status_is_the_same_from_any_folder(tmp_path):
    """A relative data path is relative to the recipe, so a finished stage is not "outdated"
    (and retrained by `run`) because the command runs from another folder."""
    pipe, workdir = _finished_stage(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    answers = [_status(pipe, workdir, cwd) for cwd in (tmp_path / "cfg", tmp_path / "elsewhere")]
    assert all(a.returncode == 0 for a in answers), [a.stderr for a in answers]
    assert answers[0].stdout == answers[1].stdout
    assert answers[0].stdout.splitlines()[1].split()[:2] == ["backbone", "done"]


def test_status_with_a_missing_data_folder_names_it(tmp_path):
    pipe, workdir = _finished_stage(tmp_path)
    (tmp_path / "data" / "classify" / "train" / "_info.json").unlink()
    out = _status(pipe, workdir, tmp_path)
    assert out.returncode == 2 and "outdated" not in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "data" / "classify") in lines[0]


def test_a_missing_data_folder_is_an_error_naming_it(tmp_path):
    from stages.inputs import InputError, input_fingerprints

    with pytest.raises(InputError, match=str(tmp_path / "gone")):
        input_fingerprints(tmp_path, "p", [], str(tmp_path / "gone"))
