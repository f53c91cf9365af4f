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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import submitit

from pipeline.config import load_config

ExecutorKind = Literal["local", "slurm"]
PREEMPT_SIGNALS = ("USR2", "TERM")
_OPTIONAL_STRINGS = ("partition", "account", "qos", "constraint")


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
        slurm_signal_delay_s=cluster.signal_delay_s,
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
