"""Names and cluster values never reach folders or the batch script unchecked: a name with
'../' or a newline, `slurm_params: {dependency: singleton}` and control characters in a cluster
file are one-line errors of the real command, and nothing is created or submitted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launch.executors import SRUN_ARGS, ClusterConfig, load_cluster_config, make_executor
from launch.graph import load_pipeline
from pipeline.config import ConfigError
from tests.faults.conftest import BACKBONE_TINY, assert_one_line_error, detrforge

pytestmark = pytest.mark.timeout(300)


def _pipeline(tmp_path: Path, name: str, stage: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(json.dumps({"name": name, "stages": [{"name": stage,
                                                          "recipe": str(BACKBONE_TINY)}]}))
    return path


@pytest.mark.parametrize(("name", "stage", "bad"), [
    ("../escaped", "backbone", "pipeline name '../escaped'"),
    (".", "backbone", "pipeline name '.'"),
    ("pipe", "..", "stage name '..'"),
    ("pipe", "a/../../b", "stage name 'a/../../b'"),
    ("pipe", "two\nlines", "stage name 'two\\nlines'"),
    ("pipe\n#SBATCH --x", "backbone", "pipeline name 'pipe\\n#SBATCH --x'"),
    ("-pipe", "backbone", "pipeline name '-pipe'"),
    ("pipe", "has space", "stage name 'has space'"),
], ids=["dotdot-pipeline", "dot-pipeline", "dotdot-stage", "path-stage", "newline-stage",
        "newline-pipeline", "dash-first", "space"])
def test_bad_names_are_config_errors(tmp_path, name, stage, bad):
    with pytest.raises(ConfigError, match="not a valid name") as caught:
        load_pipeline(_pipeline(tmp_path, name, stage))
    assert bad in str(caught.value)


@pytest.mark.parametrize(("name", "stage", "bad"), [
    ("../escaped", "backbone", "pipeline name '../escaped'"),
    ("pipe", "two\nlines", "stage name 'two\\nlines'"),
], ids=["dotdot", "newline"])
def test_run_with_a_bad_name_is_one_line_and_creates_nothing(tmp_path, name, stage, bad):
    workdir = tmp_path / "deep" / "runs"
    done = detrforge("run", _pipeline(tmp_path, name, stage), "--workdir", workdir)
    assert_one_line_error(done, bad, "not a valid name")
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escaped").exists()


def test_good_names_load(tmp_path):
    pipeline = load_pipeline(_pipeline(tmp_path, "demo.v2-b_1", "Stage_1.a-b"))
    assert pipeline.name == "demo.v2-b_1" and pipeline.stages[0].name == "Stage_1.a-b"


@pytest.mark.parametrize(("text", "needles"), [
    ("slurm_params: {dependency: singleton}\n", ("slurm_params.dependency", "cannot be overridden")),
    ("slurm_params: {requeue: false}\n", ("slurm_params.requeue",)),
    ("slurm_params: {signal: 'KILL@1'}\n", ("slurm_params.signal",)),
    ("slurm_params: {job_name: x}\n", ("slurm_params.job_name",)),
    ("slurm_params: {output: /dev/null}\n", ("slurm_params.output",)),
    ("slurm_params: {time: 5}\n", ("slurm_params.time", "'time_min'")),
    ('partition: "gpu\\n#SBATCH --dependency=singleton"\n', ("partition=", "control character")),
    ('account: "proj\\tx"\n', ("account=", "control character")),
    ('slurm_params: {comment: "a\\rb"}\n', ("slurm_params['comment']", "control character")),
    ('slurm_params: {"x\\ny": 1}\n', ("control character",)),
    ('slurm_params: {"--x": 1}\n', ("not an sbatch option name",)),
], ids=["dependency", "requeue", "signal", "job-name", "output", "field-option", "newline",
        "tab", "carriage-return", "newline-key", "dashes-key"])
def test_bad_cluster_files_are_errors_naming_key_and_file(tmp_path, text, needles):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_cluster_config(cluster)
    for needle in (str(cluster), *needles):
        assert needle in str(caught.value)


@pytest.mark.parametrize("text", ["slurm_params: {dependency: singleton}\n",
                                  'partition: "gpu\\n#SBATCH --dependency=singleton"\n'],
                         ids=["dependency", "newline"])
def test_submit_with_a_bad_cluster_file_submits_nothing(tmp_path, text):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(text)
    done = detrforge("submit", _pipeline(tmp_path, "pipe", "backbone"), "--cluster", cluster,
                     "--workdir", tmp_path / "runs")
    assert_one_line_error(done, str(cluster))
    assert not (tmp_path / "runs" / "pipe").exists()


def test_srun_kills_every_task_when_one_fails(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = make_executor("slurm", tmp_path / "%j", ClusterConfig(slurm_params={"exclusive": True}))
    text = executor._executor._make_submission_file_text("python -m job", "uid")
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and SRUN_ARGS == ("--kill-on-bad-exit=1",)
    assert "#SBATCH --exclusive" in text and "#SBATCH --requeue" in text
