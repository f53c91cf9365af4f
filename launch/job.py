"""The one callable that submitit runs for a stage, locally or on SLURM.

:class:`StageJob` imports a callable by name (``"launch.stage_main:run_stage"``), exports the
distributed environment from submitit (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
calls it with its keyword arguments plus ``job=JobContext(...)``.

Stopping and requeueing. The time-limit or preemption signal reaches the job's tasks inside a
signal handler, in the middle of a step. A ZeRO checkpoint needs every rank, so nothing is saved
there: the handler only writes a stop request (``<run_folder>/STOP_REQUESTED``, holding the id of
the current attempt). The training loop polls :meth:`JobContext.stop_requested` at step
boundaries, agrees on it across ranks (any rank stopping stops all), saves and returns. Then rank 0
hands over to submitit's own handler, which calls :meth:`StageJob.checkpoint` and requeues the job
under the same id. The requeued job starts from the run folder's ``latest`` checkpoint, the
stage's default resume order, so ``checkpoint()`` needs no state beyond the constructor's
arguments. A job is requeued at most ``max_requeues`` times (``SLURM_RESTART_COUNT``, or a counter
in the run folder for the local executor); a target that raises fails the job and is not requeued.
A target that never polls the stop request is requeued ``stop_grace_s`` after the signal, when set
(like submitit's own behaviour), else it runs on until SLURM ends it at the time limit.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import DelayedSubmission

from pipeline import dist
from pipeline.atomic import write_json_atomic
from pipeline.run_folder import STOP_FILE

STOP_FILE_NAME = STOP_FILE
REQUEUE_COUNT_FILE_NAME = "requeue_count.json"


class StageJobError(ValueError):
    """A stage job built with a target or arguments that cannot run."""


class RequeueLimitError(RuntimeError):
    """The job was requeued more often than its ``max_requeues`` allows."""


@dataclass(frozen=True)
class JobContext:
    """What a stage callable learns about the job that runs it (its ``job=`` argument)."""

    run_folder: str  # the stage's run folder: checkpoints, latest, logs
    stop_file: str  # written when the job must stop; see stop_requested()
    job_id: str  # scheduler job id ("local" job ids are the controller's pid); "direct" outside submitit
    restart_count: int  # 0 on the first run, n after n requeues
    rank: int  # global rank of this process
    world_size: int  # number of processes in the job
    local_rank: int  # rank on this node

    @property
    def attempt(self) -> str:
        """Id of this run of the job; a stop request only counts for the attempt that wrote it."""
        return f"{self.job_id}:{self.restart_count}"

    @property
    def is_restart(self) -> bool:
        """True when the job was requeued and this is a later attempt."""
        return self.restart_count > 0

    def stop_requested(self) -> bool:
        """True once a stop was requested in this attempt (cheap: one small file read)."""
        try:
            return Path(self.stop_file).read_text().strip() == self.attempt
        except FileNotFoundError:
            return False

    def clear_stale_stop_request(self) -> None:
        """Remove a stop request left by an earlier attempt, for loops that only test existence."""
        try:
            if Path(self.stop_file).read_text().strip() != self.attempt:
                Path(self.stop_file).unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def request_stop(self) -> None:
        """Ask every rank to stop at the next step boundary (atomic write; safe in a signal handler)."""
        tmp = f"{self.stop_file}.{os.getpid()}.tmp"
        Path(tmp).write_text(self.attempt + "\n")
        os.replace(tmp, self.stop_file)


def resolve_target(target: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (or any callable attribute)."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise StageJobError(f"target {target!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise StageJobError(f"target {target!r}: cannot import {module_name!r} ({err}); is the "
                            "project installed in the job's Python (pip install -e .)?") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise StageJobError(f"target {target!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise StageJobError(f"target {target!r} is not callable")
    return obj


class StageJob(submitit.helpers.Checkpointable):
    """Runs ``target(**kwargs, job=JobContext)`` as a submitit job; requeues itself on a stop signal.

    ``kwargs`` must be plain data (what JSON can hold): the job is pickled and may be rebuilt by a
    later version of the code after a requeue.
    """

    def __init__(self, target: str, kwargs: dict[str, Any] | None, run_folder: str | Path,
                 max_requeues: int = 3, stop_grace_s: float | None = None) -> None:
        self.target = target
        self.kwargs = dict(kwargs or {})
        self.run_folder = str(run_folder)
        self.max_requeues = max_requeues
        # After a stop signal, the target has this long to save and return before rank 0 requeues
        # the job anyway (for targets that never poll the stop request); None: wait for it.
        self.stop_grace_s = stop_grace_s
        if max_requeues < 0:
            raise StageJobError(f"max_requeues must be >= 0, got {max_requeues}")
        if stop_grace_s is not None and stop_grace_s <= 0:
            raise StageJobError(f"stop_grace_s must be > 0 or None, got {stop_grace_s}")
        if "job" in self.kwargs:
            raise StageJobError("kwargs may not hold 'job': StageJob passes the JobContext under that name")
        try:
            json.dumps(self.kwargs)
        except (TypeError, ValueError) as err:
            raise StageJobError(f"kwargs of {target!r} must be plain data (dicts, lists, str, "
                                f"numbers, bool, None): {err}") from None
        resolve_target(target)  # fail at submission, not in the queue an hour later

    def __call__(self) -> Any:
        context = job_context(self.run_folder, export_env=True)
        if context.restart_count > self.max_requeues:
            raise RequeueLimitError(
                f"job {context.job_id} of {self.target!r} was requeued {context.restart_count} times, "
                f"more than max_requeues={self.max_requeues}; see the logs in {self.run_folder}")
        function = resolve_target(self.target)
        context.clear_stale_stop_request()
        return self._run(function, context)

    def _run(self, function: Callable[..., Any], context: JobContext) -> Any:
        stop_signal = preempt_signal()
        submitit_handler = signal.getsignal(stop_signal)
        can_requeue = context.rank == 0 and callable(submitit_handler)
        handed_off = False

        def requeue(*_: Any) -> None:
            # submitit's handler calls self.checkpoint(), requeues the job and exits this process
            # (SystemExit). Ours stays installed from here on: the SIGTERM that SLURM sends with
            # the requeue must not enter submitit's handler a second time, whose second
            # `scontrol requeue` fails and would be stored as the job's result.
            nonlocal handed_off
            handed_off = True
            submitit_handler(stop_signal, None)

        def on_stop(signum: int, frame: Any) -> None:
            first = not context.stop_requested()
            context.request_stop()
            if first and can_requeue and self.stop_grace_s is not None:
                signal.signal(signal.SIGALRM, requeue)
                signal.setitimer(signal.ITIMER_REAL, self.stop_grace_s)

        signal.signal(stop_signal, on_stop)
        try:
            result = function(**self.kwargs, job=context)
            signal.setitimer(signal.ITIMER_REAL, 0)  # returned within the grace time
            if context.stop_requested() and can_requeue:
                requeue()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if not handed_off:
                signal.signal(stop_signal, submitit_handler)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """Called by submitit on rank 0: ask for a stop and return a fresh copy of this job to requeue.

        Returns None (no requeue: submitit ends the job as failed) once ``max_requeues`` is spent.
        """
        context = job_context(self.run_folder, export_env=False)
        if not context.stop_requested():
            context.request_stop()
        if context.restart_count >= self.max_requeues:
            return None
        _record_requeue(context)
        fresh = type(self)(self.target, self.kwargs, self.run_folder, self.max_requeues,
                           self.stop_grace_s)
        return DelayedSubmission(fresh, *args, **kwargs)


def preempt_signal() -> signal.Signals:
    """The signal submitit treats as "stop and requeue": USR2, or ``$SUBMITIT_PREEMPT_SIGNAL``."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise StageJobError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name (e.g. USR2, TERM)") from None


def job_context(run_folder: str | Path, export_env: bool) -> JobContext:
    """The :class:`JobContext` of this process; ``export_env`` also sets RANK, MASTER_ADDR... ."""
    Path(run_folder).mkdir(parents=True, exist_ok=True)
    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:  # called directly, not by submitit: a single process or torchrun
        job_id = "direct"
        rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in
                                        (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    else:
        if export_env:
            # pipeline.dist picks the GPU from LOCAL_RANK, so every rank keeps seeing all devices.
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True)
            _export_rendezvous(job_env.hostnames[0], job_env.job_id)
        job_id = job_env.job_id
        rank, world_size, local_rank = job_env.global_rank, job_env.num_tasks, job_env.local_rank
    return JobContext(run_folder=str(run_folder), stop_file=str(Path(run_folder) / STOP_FILE_NAME),
                      job_id=job_id, restart_count=_restart_count(run_folder, job_id),
                      rank=rank, world_size=world_size, local_rank=local_rank)


def _export_rendezvous(first_node: str, job_id: str) -> None:
    """MASTER_ADDR/MASTER_PORT from SLURM's node list and job id, replacing submitit's: its
    address is the node's name, which several slurmd on one host do not make resolvable, and
    its port is drawn at random from the job id, so two jobs on one host may draw the same."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    os.environ["MASTER_ADDR"] = dist.node_address(first_node)
    os.environ["MASTER_PORT"] = str(dist.slurm_master_port(os.environ.get("SLURM_JOB_ID", job_id)))


def _restart_count(run_folder: str | Path, job_id: str) -> int:
    # SLURM counts every requeue, ours and `scontrol requeue` alike; the local executor restarts
    # its tasks under the same job id without telling, so checkpoint() counts in the run folder.
    if "SLURM_RESTART_COUNT" in os.environ:
        return int(os.environ["SLURM_RESTART_COUNT"])
    path = Path(run_folder) / REQUEUE_COUNT_FILE_NAME
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0
    return int(record.get("count", 0)) if record.get("job_id") == job_id else 0


def _record_requeue(context: JobContext) -> None:
    path = Path(context.run_folder) / REQUEUE_COUNT_FILE_NAME
    write_json_atomic(path, {"job_id": context.job_id, "count": context.restart_count + 1})
