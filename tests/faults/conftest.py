"""Shared pieces of the fault-injection tests: the real `detrforge` command, a process that
holds a folder's lock, and a pipeline whose one stage is already done (so `run` is quick)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKBONE_TINY = ROOT / "configs" / "stages" / "backbone_pretrain" / "tiny.yaml"
HOLDER = """
import sys, time
from launch.executors import folder_lock
lock = folder_lock(sys.argv[1], sys.argv[2])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def detrforge(*args: str | Path, cwd: Path = ROOT, env: dict | None = None,
              timeout: float = 180) -> subprocess.CompletedProcess:
    """The installed `detrforge` entry point in a new process."""
    exe = Path(sys.executable).parent / "detrforge"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and one line on stderr, `detrforge: ...`, holding every needle."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("detrforge: "), done.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@contextmanager
def lock_holder(folder: Path, purpose: str, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Another process that holds ``folder``'s lock until the block ends (then it is killed)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), purpose],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, **(env or {})})
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.fixture
def finished_pipeline(tmp_path) -> tuple[Path, Path]:
    """(pipeline file, workdir): pipeline 'pipe' whose one stage 'backbone' is done and up to
    date (DONE.json with the hash and inputs the launcher computes), tracking off."""
    from launch.graph import load_pipeline, stage_inputs

    (tmp_path / "data" / "classify" / "train").mkdir(parents=True)
    (tmp_path / "data" / "classify" / "train" / "_info.json").write_text('{"shards": []}')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {BACKBONE_TINY}\ndata:\n  shards: data/classify\n"
                      "tracking:\n  enabled: false\n")
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text("name: pipe\nstages:\n  - name: backbone\n    recipe: recipe.yaml\n")
    workdir = tmp_path / "runs"
    pipeline = load_pipeline(pipe)
    spec = pipeline.stage("backbone")
    run_dir = pipeline.run_dir(workdir, "backbone")
    run_dir.mkdir(parents=True)
    import torch

    from pipeline.export import write_export

    write_export(run_dir / "export", {"w": torch.zeros(1)}, {})  # a done stage has its export
    (run_dir / "DONE.json").write_text(json.dumps(
        {"config_hash": spec.config_hash, "inputs": stage_inputs(pipeline, spec, workdir),
         "stage": "backbone", "status": "done"}))
    return pipe, workdir
