"""ClusterConfig loading, the sbatch options make_executor asks for, and StageJob without a cluster."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from submitit.helpers import DelayedSubmission

from launch.executors import (
    ClusterConfig,
    ExecutorError,
    load_cluster_config,
    make_executor,
    slurm_additional_parameters,
)
from launch.job import STOP_FILE_NAME, JobContext, StageJob, StageJobError, job_context
from pipeline.config import ConfigError

CLUSTERS = Path(__file__).resolve().parents[2] / "configs" / "clusters"


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """An `srun` on the PATH, which is all submitit checks before building a SLURM executor."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def outside_any_job(monkeypatch):
    for name in ("SUBMITIT_EXECUTOR", "SLURM_RESTART_COUNT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "SUBMITIT_PREEMPT_SIGNAL"):
        monkeypatch.delenv(name, raising=False)


def sbatch_lines(executor) -> set[str]:
    text = executor._executor._make_submission_file_text("python -m job", "uid")
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


# ------------------------------------------------------------------ ClusterConfig

def test_shipped_cluster_files_load():
    local = load_cluster_config(CLUSTERS / "local.yaml")
    assert (local.partition, local.ranks_per_node, local.gpus_per_node) == ("debug", 2, 0)
    example = load_cluster_config(CLUSTERS / "example.yaml")
    assert example.ranks_per_node == example.gpus_per_node == 8  # one rank per GPU
    assert example.preempt_signal == "TERM" and example.slurm_params == {"exclusive": True}


def test_cluster_file_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("partition: gpu\ngpus_per_node: 4\n")
    assert load_cluster_config(path, ["time_min=30"]).time_min == 30
    path.write_text("partition: gpu\ngpus_per_nodes: 4\n")
    with pytest.raises(ConfigError, match="gpus_per_node"):
        load_cluster_config(path)


@pytest.mark.parametrize("fields, message", [
    ({"gpus_per_node": 4, "tasks_per_node": 2}, "one GPU"),
    ({"time_min": 1, "signal_delay_s": 60}, "not shorter than the time limit"),
    ({"preempt_signal": "KILL"}, "preempt_signal"),
    ({"account": ""}, "empty string"),
    ({"nodes": 0}, "nodes must be"),
    ({"max_requeues": -1}, "max_requeues"),
])
def test_cluster_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**fields)


def test_ranks_per_node_defaults():
    assert ClusterConfig().ranks_per_node == 1
    assert ClusterConfig(gpus_per_node=4).ranks_per_node == 4
    assert ClusterConfig(tasks_per_node=3).ranks_per_node == 3


# ------------------------------------------------------------------ executors

def test_additional_parameters_carry_dependency_account_and_signal():
    cluster = ClusterConfig(account="proj", qos="high", constraint="a100", signal_delay_s=90,
                            slurm_params={"exclusive": True, "comment": "x"})
    params = slurm_additional_parameters(cluster, "afterok:42")
    assert params == {"requeue": True, "comment": "x", "account": "proj", "qos": "high", "constraint": "a100",
                      "dependency": "afterok:42", "signal": "USR2@90", "exclusive": True}


def test_slurm_executor_writes_the_expected_sbatch_options(tmp_path, fake_srun):
    cluster = ClusterConfig(partition="gpu", account="proj", gpus_per_node=8, cpus_per_task=10,
                            mem_gb=480, time_min=240, signal_delay_s=300, preempt_signal="TERM")
    executor = make_executor("slurm", tmp_path / "%j", cluster, job_name="detr", dependency="afterok:7")
    assert executor.cluster == "slurm"
    lines = sbatch_lines(executor)
    for expected in ("--partition=gpu", "--account=proj", "--gpus-per-node=8", "--ntasks-per-node=8",
                     "--cpus-per-task=10", "--mem=480GB", "--time=240", "--job-name=detr",
                     "--dependency=afterok:7", "--requeue", "--signal=TERM@300"):
        assert f"#SBATCH {expected}" in lines, expected
    assert not any("USR2" in line for line in lines)
    text = executor._executor._make_submission_file_text("python -m job", "uid")
    assert "export SUBMITIT_PREEMPT_SIGNAL=TERM" in text


def test_slurm_executor_defaults_leave_site_choices_out(tmp_path, fake_srun):
    lines = sbatch_lines(make_executor("slurm", tmp_path, ClusterConfig()))
    assert "#SBATCH --signal=USR2@120" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert not any(k in line for line in lines for k in ("--account", "--partition", "--gpus",
                                                         "--dependency", "--mem"))


def test_local_executor_is_chosen_even_with_srun_on_the_path(tmp_path, fake_srun):
    executor = make_executor("local", tmp_path, ClusterConfig(tasks_per_node=2))
    assert executor.cluster == "local"
    assert executor._executor.parameters["tasks_per_node"] == 2


@pytest.mark.parametrize("kind, cluster, dependency, message", [
    ("local", None, "afterok:1", "cannot chain|runs jobs at once"),
    ("local", ClusterConfig(nodes=2), None, "one node"),
    ("cloud", None, None, "not one of"),
])
def test_make_executor_rejects(tmp_path, kind, cluster, dependency, message):
    with pytest.raises(ExecutorError, match=message):
        make_executor(kind, tmp_path, cluster, dependency=dependency)


def test_slurm_executor_without_slurm_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun anywhere
    with pytest.raises(ExecutorError, match="cluster.sh up"):
        make_executor("slurm", tmp_path, ClusterConfig())


# ------------------------------------------------------------------ StageJob

@pytest.mark.parametrize("target, kwargs, message", [
    ("launch.selftest", {}, "package.module:function"),
    ("launch.no_such_module:f", {}, "cannot import"),
    ("launch.selftest:no_such_function", {}, "no attribute"),
    ("launch.selftest:write_marker", {"path": object()}, "plain data"),
    ("launch.selftest:write_marker", {"job": 1}, "JobContext"),
])
def test_stage_job_rejects_bad_targets_at_construction(tmp_path, target, kwargs, message):
    with pytest.raises(StageJobError, match=message):
        StageJob(target, kwargs, tmp_path)


@pytest.mark.parametrize("limits, message", [({"max_requeues": -1}, "max_requeues"),
                                             ({"stop_grace_s": 0}, "stop_grace_s")])
def test_stage_job_rejects_bad_limits(tmp_path, limits, message):
    with pytest.raises(StageJobError, match=message):
        StageJob("launch.selftest:write_marker", {"path": "x"}, tmp_path, **limits)


def test_direct_call_passes_a_job_context(tmp_path, outside_any_job):
    marker = tmp_path / "marker"
    assert StageJob("launch.selftest:write_marker", {"path": str(marker)}, tmp_path / "run")() == str(marker)
    assert marker.read_text() == "direct"


def test_preempt_signal_becomes_a_stop_request_and_handler_is_restored(tmp_path, outside_any_job):
    before = signal.getsignal(signal.SIGUSR2)
    seen = StageJob("launch.selftest:signal_self", {}, tmp_path)()
    assert seen == {"before": False, "after": True}
    assert signal.getsignal(signal.SIGUSR2) is before
    assert (tmp_path / STOP_FILE_NAME).read_text().strip() == "direct:0"


def test_the_signal_that_comes_with_the_requeue_does_not_requeue_twice(tmp_path, outside_any_job):
    # submitit's handler requeues the job and exits; SLURM's SIGTERM for that requeue must not
    # reach it again (a second `scontrol requeue` fails and becomes the job's stored result).
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)

    before = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            StageJob("launch.selftest:signal_self", {}, tmp_path)()
        os.kill(os.getpid(), signal.SIGUSR2)  # the requeue's signal, after the hand-off
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_stop_request_of_an_older_attempt_is_ignored(tmp_path):
    context = JobContext(str(tmp_path), str(tmp_path / STOP_FILE_NAME), "17", 1, 0, 1, 0)
    (tmp_path / STOP_FILE_NAME).write_text("17:0\n")
    assert not context.stop_requested()
    context.request_stop()
    assert context.stop_requested()


def test_a_new_attempt_removes_the_stop_request_of_the_last_one(tmp_path, outside_any_job):
    (tmp_path / STOP_FILE_NAME).write_text("direct:7\n")  # an older attempt's request
    StageJob("launch.selftest:write_marker", {"path": str(tmp_path / "marker")}, tmp_path)()
    assert not (tmp_path / STOP_FILE_NAME).exists()
    (tmp_path / STOP_FILE_NAME).write_text("direct:0\n")
    context = JobContext(str(tmp_path), str(tmp_path / STOP_FILE_NAME), "direct", 0, 0, 1, 0)
    context.clear_stale_stop_request()  # the current attempt's own request stays
    assert context.stop_requested()


def test_checkpoint_requests_stop_and_requeues_a_fresh_job_until_the_limit(tmp_path, outside_any_job):
    job = StageJob("launch.selftest:write_marker", {"path": "x"}, tmp_path, max_requeues=2,
                   stop_grace_s=30.0)
    for restart in range(2):
        assert job_context(tmp_path, export_env=False).restart_count == restart
        delayed = job.checkpoint()
        assert isinstance(delayed, DelayedSubmission) and delayed.function is not job
        fresh = delayed.function
        assert (fresh.target, fresh.kwargs, fresh.run_folder, fresh.max_requeues,
                fresh.stop_grace_s) == (job.target, job.kwargs, job.run_folder, 2, 30.0)
        assert (tmp_path / STOP_FILE_NAME).read_text().strip() == f"direct:{restart}"
    assert json.loads((tmp_path / "requeue_count.json").read_text())["count"] == 2
    assert job.checkpoint() is None  # limit reached: submitit ends the job instead of requeueing


def test_slurm_restart_count_wins_and_bounds_the_job(tmp_path, outside_any_job, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "4")
    assert job_context(tmp_path, export_env=False).restart_count == 4
    with pytest.raises(RuntimeError, match="requeued 4 times"):
        StageJob("launch.selftest:write_marker", {"path": "x"}, tmp_path, max_requeues=3)()


@pytest.mark.dist
def test_local_executor_runs_two_ranks_through_stage_job(tmp_path):
    executor = make_executor("local", tmp_path / "submitit", ClusterConfig(tasks_per_node=2, time_min=5))
    job = executor.submit(StageJob("launch.selftest:all_reduce_ranks", {}, tmp_path / "run"))
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["total"] == 3.0 for r in results)
