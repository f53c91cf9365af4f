"""DINO under DeepSpeed ZeRO with 2 real processes (gloo on CPU): a rank whose whole batch has
no box (so no denoising queries) still finishes its steps with the other rank, no hang."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.torchrun_env import torchrun_env

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dino_worker.py")
LAUNCH_TIMEOUT_S = 300  # a hang shows as a timeout


def _env() -> dict[str, str]:
    return torchrun_env()


@pytest.mark.parametrize("zero_stage", [2])
def test_empty_targets_on_one_rank_finish_the_steps(tmp_path, zero_stage):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), "--run-dir", str(tmp_path), "--zero-stage", str(zero_stage), "--steps", "2"]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = [json.loads((tmp_path / f"done_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["step"] for r in results] == [2, 2]
    assert all(r["loss"] == r["loss"] for r in results)  # finite, not NaN
