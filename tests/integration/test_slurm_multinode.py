"""Multi-node jobs on the two-node local cluster (`launch/slurm/cluster.sh up --nodes 2`: nodes
n1 and n2, two slurmd on this host). Skipped, with the reason, when the cluster has fewer nodes.

One module fixture submits the same ZeRO-2 backbone stage twice at once: on one node with 2 tasks
(the reference) and on 2 nodes with 1 task each, which `scontrol requeue` interrupts once it has a
checkpoint. The 2-node run must end with the reference's losses and export.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import test_slurm_pipeline as single

from launch.executors import ClusterConfig, load_cluster_config, make_executor
from launch.job import StageJob

REPO = Path(__file__).resolve().parents[2]
TWO_NODES = REPO / "configs" / "clusters" / "local_2nodes.yaml"
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
# Enough steps that the requeue, sent once the first checkpoint exists, lands before the end
# on a busy machine too (with 16 steps the job had once saved its last step by then).
STEPS = ("train.max_steps=40", "train.checkpoint_every=4", *single.NO_TRACKING)


@pytest.fixture(scope="module")
def two_nodes(slurm_env) -> list[str]:
    """The node names of the cluster; skips unless it has two."""
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], env=slurm_env,
                         capture_output=True, text=True, timeout=15).stdout.split()
    if len(set(out)) < 2:
        pytest.skip(f"the local cluster has nodes {out}: start it with "
                    "launch/slurm/cluster.sh up --nodes 2")
    return sorted(set(out))


slurm_env = single.slurm_env
samples = single.samples


def test_cross_node_all_reduce(two_nodes, slurm_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    cluster = ClusterConfig(**{**load_cluster_config(TWO_NODES).__dict__})
    executor = make_executor("slurm", tmp_path / "submitit" / "%j", cluster, job_name="xnode")
    job = executor.submit(StageJob("launch.selftest:all_reduce_ranks", {}, tmp_path / "xnode"))
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["total"] for r in results] == [3.0, 3.0]
    assert [r["node"] for r in results] == two_nodes[:2]  # one rank per node
    assert {r["master_addr"] for r in results} == {"127.0.0.1"}  # n1's NodeAddr, not its name
    assert {r["master_port"] for r in results} == {20000 + int(job.job_id) % 20000}


@pytest.fixture(scope="module")
def compared(two_nodes, slurm_env, samples, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multinode")
    stage = [single.backbone_stage(samples, STEPS)]
    reference = single.write_pipeline(root / "onenode.yaml", "onenode", stage)
    spread = single.write_pipeline(root / "twonodes.yaml", "twonodes", stage)
    ref_jobs = single.submit(slurm_env, reference, root / "ref")
    done = single.detrforge(slurm_env, "submit", str(spread), "--cluster", str(TWO_NODES),
                            "--workdir", str(root / "two"))
    assert "backbone" in done.stdout
    jobs = json.loads((root / "two" / "twonodes" / "jobs.json").read_text())
    job_id = jobs["backbone"]["job_id"]
    run_dir = root / "two" / "twonodes" / "backbone"
    single.wait_for(lambda: (run_dir / "latest").exists(), 300, "the first checkpoint")
    subprocess.run(["scontrol", "requeue", job_id], env=slurm_env, check=True, timeout=30)
    states = single.wait_final(slurm_env, {"ref": ref_jobs["backbone"], "two": job_id}, 600)
    return {"states": states, "run_dir": run_dir, "pipeline": spread, "workdir": root / "two",
            "job_id": job_id, "reference": root / "ref" / "onenode" / "backbone"}


def test_two_node_stage_requeued_ends_like_one_node_with_two_tasks(compared):
    assert compared["states"] == {"ref": "COMPLETED", "two": "COMPLETED"}
    run_dir = compared["run_dir"]
    assert json.loads((run_dir / "result.json").read_text())["start"] == "resume"
    assert "world_size: 2" in (run_dir / "config.yaml").read_text()
    logs = sorted((run_dir.parent / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, logs  # one task per node
    resumed = re.search(r"resumed exactly from \S+/step_(\d+)", logs[0].read_text())
    assert resumed and 0 < int(resumed[1]) < 40, logs[0].read_text()[-2000:]
    single.assert_same_run(run_dir, compared["reference"])


def test_status_shows_the_node_list_of_a_two_node_job(compared, slurm_env):
    status = single.detrforge(slurm_env, "status", str(compared["pipeline"]), "--workdir",
                              str(compared["workdir"])).stdout
    assert f"job {compared['job_id']} COMPLETED on n[1-2]" in status, status


def _job_processes(job_id: str, rank: int) -> list[int]:
    """PIDs of rank ``rank``'s processes in SLURM job ``job_id`` (found by their environment)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(v.split("=", 1) for v in environ.read_bytes().decode(errors="replace")
                       .split("\0") if "=" in v)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank):
            found.append(int(environ.parent.name))
    return found


def _slurmd_pid(node: str) -> int:
    home = Path(single._default_slurm_conf()).parents[1]
    return int((home / "run" / f"slurmd-{node}.pid").read_text().strip())


def test_killed_node_fails_the_job_and_the_next_submit_resumes(two_nodes, slurm_env, samples,
                                                               tmp_path):
    env = {**slurm_env, "DETRFORGE_COLLECTIVE_TIMEOUT_S": "30"}
    pipeline = single.write_pipeline(
        tmp_path / "killed.yaml", "killed",
        [single.backbone_stage(samples, ("train.max_steps=24", "train.checkpoint_every=4",
                                         *single.NO_TRACKING))])
    args = ("submit", str(pipeline), "--cluster", str(TWO_NODES), "--workdir", str(tmp_path))
    single.detrforge(env, *args)
    job_id = json.loads((tmp_path / "killed" / "jobs.json").read_text())["backbone"]["job_id"]
    run_dir = tmp_path / "killed" / "backbone"
    single.wait_for(lambda: (run_dir / "latest").exists(), 300, "the first checkpoint")
    # Node n2 dies: its slurmd first, then everything of the job there (rank 1 and its stepd).
    os.kill(_slurmd_pid(two_nodes[1]), signal.SIGKILL)
    for pid in _job_processes(job_id, 1):
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        state = single.wait_final(env, {"backbone": job_id}, 120)["backbone"]
        took = time.monotonic() - killed_at
    finally:  # the node comes back for the next submit (and the other tests)
        subprocess.run([str(REPO / "launch" / "slurm" / "cluster.sh"), "up", "--nodes", "2"],
                       env=slurm_env, check=True, capture_output=True, timeout=120)
    assert state in ("FAILED", "NODE_FAIL", "CANCELLED"), state
    assert took < 30 + 60, took  # the collective timeout, plus SLURM's bookkeeping
    assert not (run_dir / "DONE.json").exists()
    single.detrforge(env, *args)
    again = json.loads((tmp_path / "killed" / "jobs.json").read_text())["backbone"]["job_id"]
    assert again != job_id
    assert single.wait_final(env, {"backbone": again}, 600)["backbone"] == "COMPLETED"
    assert json.loads((run_dir / "result.json").read_text())["start"] == "resume"
