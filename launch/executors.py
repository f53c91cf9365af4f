"""Submitit executors for the two places a stage runs: this machine, or a SLURM cluster.

The cluster's shape (partition, account, GPUs per node, time limit...) is a small YAML file under
``configs/clusters/`` loaded into :class:`ClusterConfig`; :func:`make_executor` turns it into a
submitit executor. Both executors run the same :class:`launch.job.StageJob`, so the code path of a
stage is the same locally and on SLURM.

Signals. SLURM warns a job ``signal_delay_s`` seconds before its time limit with SIGUSR2
(``--signal=USR2@<delay>``, which may arrive up to 60 s early). Partition preemption instead sends
SIGTERM, which submitit ignores unless the job's environment has ``SUBMITIT_PREEMPT_SIGNAL=TERM``:
set ``preempt_signal: TERM`` in the cluster file for clusters that preempt, and the executor
exports it in the job and asks SLURM for ``--signal=TERM@<delay>`` as well. Either signal makes
the job request a stop, save at a step boundary and requeue itself (see ``launch/job.py``).

This module and ``launch/job.py`` are the only ones that import submitit.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import submitit

from pipeline.config import load_config
from pipeline.locks import FolderLock

ExecutorKind = Literal["local", "slurm"]
PREEMPT_SIGNALS = ("USR2", "TERM")
_OPTIONAL_STRINGS = ("partition", "account", "qos", "constraint")
# sbatch options that detrforge or submitit set and a job relies on (the chain, requeue, the stop
# signal, its name and log files): `slurm_params` must not replace them silently.
RESERVED_SBATCH_OPTIONS = ("dependency", "requeue", "no-requeue", "signal", "job-name", "output",
                           "error", "array", "open-mode", "wckey", "wrap", "parsable")
# sbatch options that the cluster file has a field for: set the field, not slurm_params.
FIELD_SBATCH_OPTIONS = {"partition": "partition", "account": "account", "qos": "qos",
                        "constraint": "constraint", "nodes": "nodes", "time": "time_min",
                        "ntasks-per-node": "tasks_per_node", "cpus-per-task": "cpus_per_task",
                        "gpus-per-node": "gpus_per_node", "mem": "mem_gb"}
_SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Every rank stops when one fails: without it the others wait in a collective until the timeout.
SRUN_ARGS = ("--kill-on-bad-exit=1",)
# squeue states of a job that may still run (or is about to), so its locks are live.
_LIVE_JOB_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING",
                    "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


class ExecutorError(ValueError):
    """An executor that cannot be built from the given kind, cluster file or dependency."""


@dataclass
class ClusterConfig:
    """Where and how large a stage job runs on a SLURM cluster (``configs/clusters/*.yaml``)."""

    partition: str | None = None  # SLURM partition; None: the cluster's default partition
    account: str | None = None  # account charged for the job (sbatch --account); None: the user's default
    qos: str | None = None  # quality of service (sbatch --qos); None: the partition's default
    constraint: str | None = None  # node features required, e.g. "a100|h100" (sbatch --constraint)
    nodes: int = 1  # nodes per job
    gpus_per_node: int = 0  # GPUs per node; one task (rank) is started per GPU
    tasks_per_node: int | None = None  # ranks per node; None: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 1  # CPU cores per rank (data-loading workers + the main process)
    mem_gb: float | None = None  # memory per node in GB; None: the partition's default
    time_min: int = 60  # wall-clock limit of one job in minutes; longer stages requeue themselves
    signal_delay_s: int = 120  # the stop signal comes this many seconds before the time limit
    preempt_signal: str = "USR2"  # "USR2", or "TERM" on clusters whose preemption sends SIGTERM
    max_requeues: int = 3  # a stage is requeued at most this many times before it is failed
    slurm_params: dict[str, Any] = field(default_factory=dict)  # extra sbatch options, e.g. {"exclusive": true}

    def __post_init__(self) -> None:
        _check_no_control_characters(self)
        _check_slurm_params(self.slurm_params)
        for name in _OPTIONAL_STRINGS:
            if getattr(self, name) == "":
                raise ValueError(f"{name} is an empty string; leave it out (null) for the default")
        for name in ("nodes", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"tasks_per_node must be >= 1 or null, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"tasks_per_node={self.tasks_per_node} but gpus_per_node={self.gpus_per_node}: a rank "
                "drives one GPU; leave tasks_per_node out (null) or set it equal to gpus_per_node")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"mem_gb must be > 0 or null, got {self.mem_gb}")
        if self.preempt_signal not in PREEMPT_SIGNALS:
            raise ValueError(f"preempt_signal must be one of {PREEMPT_SIGNALS}, got {self.preempt_signal!r}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(f"signal_delay_s={self.signal_delay_s} is not shorter than the time "
                             f"limit ({self.time_min} min): the job would be told to stop at once")

    @property
    def ranks_per_node(self) -> int:
        """Tasks started on each node: one per GPU, else ``tasks_per_node`` (default 1)."""
        return self.tasks_per_node or self.gpus_per_node or 1


def _check_no_control_characters(cluster: ClusterConfig) -> None:
    """A newline in a value would add a line to the batch script: refuse every control char."""
    for item in fields(cluster):
        value = getattr(cluster, item.name)
        texts = ([(item.name, value)] if isinstance(value, str) else
                 [(f"{item.name}[{k!r}]", t) for k, v in value.items() for t in (k, v)
                  if isinstance(t, str)] if isinstance(value, dict) else [])
        for where, text in texts:
            if _CONTROL_CHARS.search(text):
                raise ValueError(f"{where}={text!r} holds a control character (newline, tab...); "
                                 "cluster values go into the batch script as they are")


def _check_slurm_params(params: dict[str, Any]) -> None:
    for key in params:
        if not isinstance(key, str) or not _SBATCH_KEY.fullmatch(key):
            raise ValueError(f"slurm_params key {key!r} is not an sbatch option name "
                             "(letters, digits, '-' and '_')")
        option = key.replace("_", "-")
        if option in RESERVED_SBATCH_OPTIONS:
            raise ValueError(f"slurm_params.{key} is set by detrforge itself (job chains, requeue, "
                             "the stop signal, names and logs) and cannot be overridden; remove it")
        if option in FIELD_SBATCH_OPTIONS:
            raise ValueError(f"slurm_params.{key}: use the cluster file's field "
                             f"'{FIELD_SBATCH_OPTIONS[option]}' instead")


def slurm_job_alive(job_id: str) -> bool | None:
    """Whether SLURM job ``job_id`` may still run (``squeue -h -j ID -o %T``); None when SLURM
    cannot be asked (no client, no controller): the lock holder then counts as alive."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    states = {line.strip() for line in out.stdout.splitlines() if line.strip()}
    return bool(states & _LIVE_JOB_STATES)


def folder_lock(folder: str | Path, purpose: str) -> FolderLock:
    """The lock of a run or pipeline folder, held by this process, or by its SLURM job when it
    runs in one (a requeued job takes over its own earlier lock)."""
    return FolderLock(folder, purpose, job_alive=slurm_job_alive,
                      job_id=os.environ.get("SLURM_JOB_ID"))


def load_cluster_config(path: str | Path, overrides: list[str] | None = None) -> ClusterConfig:
    """Read ``configs/clusters/<name>.yaml`` (with ``base:`` and ``key=value`` overrides)."""
    return load_config(path, ClusterConfig, overrides)


def make_executor(kind: ExecutorKind, folder: str | Path, cluster: ClusterConfig | None = None,
                  job_name: str = "detrforge", dependency: str | None = None) -> submitit.Executor:
    """A submitit executor that runs jobs here (``"local"``) or on SLURM (``"slurm"``).

    The cluster is named explicitly: submitit's automatic choice picks SLURM whenever ``srun`` is
    on the PATH, even without a cluster behind it. ``folder`` receives submitit's pickles and the
    job logs (``%j`` is replaced by the job id). ``dependency`` is a SLURM dependency such as
    ``"afterok:1234"``; the local executor cannot chain jobs (wait for the parent's result).
    """
    cluster = cluster or ClusterConfig()
    if kind == "local":
        if dependency:
            raise ExecutorError(f"dependency {dependency!r}: the local executor runs jobs at once; "
                                "wait for the parent job's result() before submitting the next")
        return _local_executor(folder, cluster, job_name)
    if kind == "slurm":
        return _slurm_executor(folder, cluster, job_name, dependency)
    raise ExecutorError(f"executor kind {kind!r} is not one of 'local', 'slurm'")


def _local_executor(folder: str | Path, cluster: ClusterConfig, job_name: str) -> submitit.Executor:
    if cluster.nodes != 1:
        raise ExecutorError(f"the local executor runs on one node, got nodes={cluster.nodes}")
    executor = submitit.AutoExecutor(folder, cluster="local")
    executor.update_parameters(
        name=job_name, timeout_min=cluster.time_min, nodes=1, tasks_per_node=cluster.ranks_per_node,
        gpus_per_node=cluster.gpus_per_node, cpus_per_task=cluster.cpus_per_task)
    return executor


def _slurm_executor(folder: str | Path, cluster: ClusterConfig, job_name: str,
                    dependency: str | None) -> submitit.Executor:
    try:
        executor = submitit.AutoExecutor(folder, cluster="slurm",
                                         slurm_max_num_timeout=cluster.max_requeues)
    except RuntimeError as err:  # submitit: 'Could not detect "srun"'
        raise ExecutorError(f"no SLURM client here ({err}); install slurm-client or start the local "
                            "test cluster with launch/slurm/cluster.sh up") from None
    params: dict[str, Any] = dict(
        name=job_name, timeout_min=cluster.time_min, nodes=cluster.nodes,
        tasks_per_node=cluster.ranks_per_node, cpus_per_task=cluster.cpus_per_task,
        slurm_signal_delay_s=cluster.signal_delay_s, slurm_srun_args=list(SRUN_ARGS),
        slurm_additional_parameters=slurm_additional_parameters(cluster, dependency))
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    if cluster.mem_gb is not None:
        params["mem_gb"] = cluster.mem_gb
    if cluster.partition:
        params["slurm_partition"] = cluster.partition
    if cluster.preempt_signal != "USR2":
        # The job's submitit must handle the same signal SLURM sends.
        params["slurm_setup"] = [f"export SUBMITIT_PREEMPT_SIGNAL={cluster.preempt_signal}"]
    executor.update_parameters(**params)
    return executor


def slurm_additional_parameters(cluster: ClusterConfig, dependency: str | None = None) -> dict[str, Any]:
    """Extra sbatch options (``--key=value``; ``True`` gives a bare ``--key``) for a cluster."""
    params: dict[str, Any] = {"requeue": True}
    for name in ("account", "qos", "constraint"):
        if getattr(cluster, name):
            params[name] = getattr(cluster, name)
    if dependency:
        params["dependency"] = dependency
    # Overrides submitit's own --signal=USR2@delay when the cluster preempts with SIGTERM.
    params["signal"] = f"{cluster.preempt_signal}@{cluster.signal_delay_s}"
    params.update(cluster.slurm_params)
    return params
