"""`detrforge sweep --cluster`: a 4-point sweep (2 learning rates x 2 seeds) of the tiny backbone
stage as one SLURM job array on the local cluster, at most 2 tasks at once.

Skipped, with the reason, when the local cluster is not up (`launch/slurm/cluster.sh up`).
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import test_slurm_pipeline as single

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "stages" / "backbone_pretrain" / "tiny.yaml"
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
# A few steps of a tiny model: the test is about the array, not the training.
TINY = ["model.name=resnet10t", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=16", "train.max_steps=3", "train.checkpoint_every=3",
        "train.eval_every=0", *single.FAST, *single.NO_TRACKING]
POINTS = ["tiny.lr_1e-3_s0", "tiny.lr_1e-3_s1", "tiny.lr_2e-3_s0", "tiny.lr_2e-3_s1"]

slurm_env = single.slurm_env
samples = single.samples


@pytest.fixture(scope="module")
def swept(slurm_env, samples, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("array") / "work"
    args = ("sweep", str(RECIPE), "--stage", "tiny", "--grid", "optim.lr=1e-3,2e-3",
            "--seeds", "0,1", "--cluster", str(single.CLUSTER_FILE), "--max-parallel", "2",
            "--workdir", str(workdir), f"data.shards={samples}/classify", *TINY)
    return workdir, single.detrforge(slurm_env, *args)


def _array_tasks(env: dict, array_id: str) -> list[tuple[str, str, datetime, datetime]]:
    """(task id, state, start, end) of every task of job array ``array_id``."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,Start,End", "-j",
                          array_id], env=env, capture_output=True, text=True, timeout=30).stdout
    rows = [line.split("|") for line in out.splitlines() if "|" in line]
    return [(job, state.split()[0], _time(start), _time(end)) for job, state, start, end in rows]


def _time(text: str) -> datetime:
    return datetime.max if text in ("Unknown", "None", "") else datetime.fromisoformat(text)


def _ended_tasks(env: dict, array_id: str) -> list[tuple[str, str, datetime, datetime]]:
    """The array's tasks once accounting knows all 4 ended (it trails the jobs by a moment)."""
    tasks: list = []

    def ended() -> bool:
        tasks[:] = _array_tasks(env, array_id)
        return len(tasks) == 4 and all(end != datetime.max for *_, end in tasks)

    single.wait_for(ended, 60, f"sacct to know the end of array {array_id}", poll_s=1.0)
    return tasks


def test_sweep_points_run_as_one_job_array_at_most_two_at_once(swept, slurm_env):
    workdir, done = swept
    line = next(line for line in done.stdout.splitlines() if "submitted job array" in line)
    array_id = line.split()[3]
    assert "(4 tasks, at most 2 at once)" in line, line
    tasks = _ended_tasks(slurm_env, array_id)
    assert sorted(job for job, *_ in tasks) == [f"{array_id}_{i}" for i in range(4)], tasks
    assert {state for _, state, *_ in tasks} == {"COMPLETED"}, tasks
    # At no moment were more than 2 tasks running (SLURM's %2 array throttle).
    for _, _, start, _ in tasks:
        running = [t for t in tasks if t[2] <= start < t[3]]
        assert len(running) <= 2, tasks
    for name in POINTS:
        record = json.loads((workdir / "tiny" / name / "DONE.json").read_text())
        assert record["stage"] == name
    config = (workdir / "tiny" / "tiny.lr_2e-3_s1" / "config.yaml").read_text()
    assert "lr: 0.002" in config and "seed: 1" in config


def test_sweep_report_lists_every_point_and_a_second_call_submits_nothing(swept, slurm_env):
    workdir, first = swept
    table = (workdir / "tiny" / "sweeps" / "tiny" / "table.md").read_text()
    assert table.count("| done |") == 4, table
    record = json.loads((workdir / "tiny" / "sweeps" / "tiny" / "sweep.json").read_text())
    assert sorted(row["point"] for row in record["rows"]) == POINTS
    again = single.detrforge(slurm_env, *[a for a in first.args[1:]])
    assert "4 points, 4 done, 0 to run" in again.stdout
    assert "submitted job array" not in again.stdout
