"""StageJob on the real local SLURM cluster (start it with `launch/slurm/cluster.sh up`).

Skipped, with the reason, only when `sinfo` cannot reach a cluster. The cluster is found through
SLURM_CONF, or else the default state folder of cluster.sh ($DETRFORGE_SLURM_HOME or .cache/slurm).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from submitit.core.utils import FailedJobError

from launch.executors import ClusterConfig, load_cluster_config, make_executor
from launch.job import STOP_FILE_NAME, StageJob

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(150)]


def _default_slurm_conf() -> Path:
    home = os.environ.get("DETRFORGE_SLURM_HOME") or REPO / ".cache" / "slurm"
    return Path(home) / "etc" / "slurm.conf"


@pytest.fixture(scope="module")
def cluster() -> ClusterConfig:
    """The local cluster's config; SLURM_CONF set for this module (jobs inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        if "SLURM_CONF" not in os.environ and _default_slurm_conf().exists():
            patch.setenv("SLURM_CONF", str(_default_slurm_conf()))
        if shutil.which("sinfo") is None:
            pytest.skip("local SLURM cluster is not up: no `sinfo` (run launch/slurm/cluster.sh up)")
        conf = os.environ.get("SLURM_CONF")
        if conf and not Path(conf).exists():  # sinfo would retry for a minute
            pytest.skip(f"local SLURM cluster is not up: SLURM_CONF={conf} does not exist "
                        "(run launch/slurm/cluster.sh up)")
        try:
            probe = subprocess.run(["sinfo", "-h", "-o", "%T"],
                                   capture_output=True, text=True, timeout=15)
            failure = probe.stderr.strip() if probe.returncode else ""
        except subprocess.TimeoutExpired:
            failure = "no answer within 15 s"
        if failure:
            pytest.skip(f"local SLURM cluster is not up: sinfo failed ({failure}); "
                        "run launch/slurm/cluster.sh up")
        yield load_cluster_config(REPO / "configs" / "clusters" / "local.yaml")


def first_node() -> str:
    """The first node of the cluster ("localhost" on one node, "n1" on several)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], capture_output=True,
                         text=True, timeout=15, check=True).stdout.split()
    return sorted(set(out))[0]


def job_state(job) -> str:
    return job.get_info(mode="force").get("State", "UNKNOWN")


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.25)


def submit(cluster: ClusterConfig, tmp_path: Path, target: str, kwargs: dict, name: str,
           dependency: str | None = None, stop_grace_s: float | None = None, **overrides):
    config = ClusterConfig(**{**cluster.__dict__, "tasks_per_node": 1, **overrides})
    executor = make_executor("slurm", tmp_path / "submitit" / "%j", config, job_name=name,
                             dependency=dependency)
    return executor.submit(StageJob(target, kwargs, tmp_path / name, config.max_requeues,
                                    stop_grace_s))


def test_two_ranks_all_reduce_with_gloo_on_fake_gpus(cluster, tmp_path):
    job = submit(cluster, tmp_path, "launch.selftest:all_reduce_ranks", {}, "allreduce",
                 gpus_per_node=2, tasks_per_node=None)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["total"] == 3.0 for r in results)
    assert len({(r["master_addr"], r["master_port"]) for r in results}) == 1
    assert all(r["cuda_visible_devices"] == "0,1" for r in results)  # gres gpu:2 was granted
    # Accounting (what submitit and sacct read) trails the controller by a moment.
    wait_for(lambda: job_state(job) == "COMPLETED", 30, "sacct to report COMPLETED")


def test_failing_parent_cancels_its_afterok_dependant(cluster, tmp_path):
    parent = submit(cluster, tmp_path, "launch.selftest:fail", {"message": "parent"}, "parent")
    marker = tmp_path / "child-ran"
    child = submit(cluster, tmp_path, "launch.selftest:write_marker", {"path": str(marker)}, "child",
                   dependency=f"afterok:{parent.job_id}")
    with pytest.raises(FailedJobError, match="selftest failure on purpose"):
        parent.result()
    wait_for(lambda: job_state(child) == "CANCELLED", 60, "the dependant to be cancelled")
    reason = subprocess.run(["squeue", "-h", "-t", "all", "-j", child.job_id, "-o", "%r"],
                            capture_output=True, text=True).stdout.strip()
    assert reason == "DependencyNeverSatisfied"
    # child.result() would raise UncompletedJobError, after waiting submitit's 15 s for a result
    # file that a cancelled job never writes: callers look at the state first.
    assert not marker.exists()


@pytest.fixture(scope="module")
def interrupted_jobs(cluster, tmp_path_factory):
    """Three running jobs interrupted at once, so that their ~10 s waits for a restart overlap:
    "requeue" by `scontrol requeue`; "stop" and "deaf" (which never polls the stop request) by
    the signal SLURM sends before the time limit."""
    tmp_path = tmp_path_factory.mktemp("interrupted")
    counted = submit(cluster, tmp_path, "launch.selftest:count_attempts", {"wait_s": 120}, "requeue")
    trained = submit(cluster, tmp_path, "launch.selftest:train_until_stopped",
                     {"steps": 12, "step_s": 0.5}, "stop")
    deaf = submit(cluster, tmp_path, "launch.selftest:count_attempts", {"wait_s": 120}, "deaf",
                  stop_grace_s=2.0)
    wait_for(lambda: all((tmp_path / name / file).exists() for name, file in (
        ("requeue", "attempts"), ("stop", "started"), ("deaf", "attempts"))), 60, "the jobs to start")
    time.sleep(1.0)
    subprocess.run(["scontrol", "requeue", counted.job_id], check=True, timeout=30)
    # What SLURM does signal_delay_s before the time limit: USR2 to every task of the job.
    for job in (trained, deaf):
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
    return {"folder": tmp_path, "requeue": counted, "stop": trained, "deaf": deaf}


def test_scontrol_requeue_reruns_the_job_under_the_same_id(interrupted_jobs):
    job = interrupted_jobs["requeue"]
    result = job.result()
    assert result == {"attempts": 2, "restart_count": 1, "is_restart": True, "job_id": job.job_id}


def test_stop_signal_saves_at_a_step_boundary_then_requeues_and_resumes(interrupted_jobs):
    tmp_path, job = interrupted_jobs["folder"], interrupted_jobs["stop"]
    result = job.result()
    saved = json.loads((tmp_path / "stop" / "saved.json").read_text())["step"]
    assert 0 < saved < 12
    assert result == {"resumed_from": saved, "final_step": 12, "restart_count": 1,
                      "job_id": job.job_id}
    assert not (tmp_path / "stop" / STOP_FILE_NAME).exists()  # the second attempt cleared it


def test_target_that_ignores_the_stop_request_is_requeued_after_the_grace_time(interrupted_jobs):
    job = interrupted_jobs["deaf"]
    result = job.result()
    assert result == {"attempts": 2, "restart_count": 1, "is_restart": True, "job_id": job.job_id}


def test_stop_signal_past_max_requeues_fails_the_job(cluster, tmp_path):
    job = submit(cluster, tmp_path, "launch.selftest:train_until_stopped",
                 {"steps": 200, "step_s": 0.5}, "limit", max_requeues=0)
    wait_for(lambda: (tmp_path / "limit" / "started").exists(), 60, "the job to start")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
    with pytest.raises(FailedJobError, match="not requeued"):
        job.result()
    assert json.loads((tmp_path / "limit" / "saved.json").read_text())["step"] > 0


def test_partition_preemption_sigterm_saves_and_resumes(cluster, tmp_path):
    # The whole node in the low-priority partition; a job in 'urgent' then preempts it (requeue,
    # SIGTERM first), which submitit only handles with SUBMITIT_PREEMPT_SIGNAL=TERM. Both ask for
    # the same node: on a cluster of several nodes the urgent job would otherwise take a free one.
    node = {"slurm_params": {"nodelist": first_node()}}
    run = tmp_path / "low"
    low = submit(cluster, tmp_path, "launch.selftest:train_until_stopped",
                 {"steps": 16, "step_s": 0.5}, "low", cpus_per_task=4, preempt_signal="TERM",
                 **node)
    wait_for(lambda: (run / "started").exists(), 60, "the low-priority job to start")
    time.sleep(1.0)
    marker = tmp_path / "urgent-ran"
    urgent = submit(cluster, tmp_path, "launch.selftest:write_marker", {"path": str(marker)},
                    "urgent", partition="urgent", **node)
    assert urgent.result() == str(marker)
    result = low.result()
    saved = json.loads((run / "saved.json").read_text())["step"]
    assert 0 < saved < 16
    # Two nodes: the requeued job can be started on the pinned node and preempted once more
    # before the urgent job has run; every start resumes from the last save.
    restarts = result.pop("restart_count")
    assert result == {"resumed_from": saved, "final_step": 16, "job_id": low.job_id}
    assert 1 <= restarts <= 3
