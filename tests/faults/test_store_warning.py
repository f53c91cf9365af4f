"""`detrforge submit` warns, in one line, when SLURM jobs would track into a SQLite file."""

from __future__ import annotations

import pytest

from launch.executors import ClusterConfig
from launch.graph import load_pipeline
from launch.slurm_submit import warn_if_sqlite_store
from tests.faults.conftest import BACKBONE_TINY


@pytest.fixture
def pipeline(tmp_path):
    (tmp_path / "pipe.yaml").write_text(f"name: pipe\nstages:\n  - name: a\n    recipe: {BACKBONE_TINY}\n")
    return load_pipeline(tmp_path / "pipe.yaml")


def test_sqlite_store_warns_once_naming_it(pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    warn_if_sqlite_store(pipeline, ClusterConfig(nodes=2), tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "on 2 nodes" in err[0] and f"sqlite:///{tmp_path}" in err[0]
    assert "MLFLOW_TRACKING_URI" in err[0]


def test_server_store_does_not_warn(pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    warn_if_sqlite_store(pipeline, ClusterConfig(nodes=2), tmp_path)
    assert capsys.readouterr().err == ""
