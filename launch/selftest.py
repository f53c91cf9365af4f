"""Small job targets that check the launch layer end to end (the SLURM and executor tests use them).

They live in an importable module because a job unpickles its callable by name: functions defined
in a test module cannot be found inside the job. Each takes ``job`` (a :class:`launch.job.JobContext`)
like a stage does.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from launch.job import JobContext, preempt_signal


def all_reduce_ranks(job: JobContext) -> dict[str, Any]:
    """Sum ``rank + 1`` over all ranks with gloo; returns what this rank saw.

    Returns {"rank", "world_size", "total" (= world_size * (world_size + 1) / 2), "master_addr",
    "master_port", "cuda_visible_devices", "node" (the SLURM node, None outside SLURM)}.
    """
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// from the variables StageJob exported
    try:
        value = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(value)
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
                "total": float(value.item()), "master_addr": os.environ["MASTER_ADDR"],
                "master_port": int(os.environ["MASTER_PORT"]),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "node": os.environ.get("SLURMD_NODENAME")}
    finally:
        dist.destroy_process_group()


def fail(message: str, job: JobContext) -> None:
    """Always raises, so a dependant job can be seen never to run."""
    raise RuntimeError(f"selftest failure on purpose: {message}")


def write_marker(path: str, job: JobContext) -> str:
    """Writes ``path`` (for checking that a job ran at all); returns it."""
    Path(path).write_text(job.job_id)
    return path


def count_attempts(wait_s: float, job: JobContext) -> dict[str, Any]:
    """Counts its runs in ``<run_folder>/attempts``; the first run waits ``wait_s`` to be requeued.

    Returns {"attempts": runs so far, "restart_count", "is_restart", "job_id"}.
    """
    counter = Path(job.run_folder) / "attempts"
    attempts = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempts))
    if attempts == 1:
        time.sleep(wait_s)
    return {"attempts": attempts, "restart_count": job.restart_count,
            "is_restart": job.is_restart, "job_id": job.job_id}


def train_until_stopped(steps: int, step_s: float, job: JobContext) -> dict[str, Any]:
    """A stand-in training loop: polls the stop request at each step boundary, "saves" the step
    reached to ``<run_folder>/saved.json`` when asked to stop, and resumes from it after a requeue.

    Returns {"resumed_from": step the run started at, "final_step", "restart_count", "job_id"}.
    """
    saved = Path(job.run_folder) / "saved.json"
    start = json.loads(saved.read_text())["step"] if saved.exists() else 0
    (Path(job.run_folder) / "started").write_text(job.attempt)
    step = start
    while step < steps:
        if job.stop_requested():
            saved.write_text(json.dumps({"step": step}))
            return {"stopped_at": step, "restart_count": job.restart_count}
        time.sleep(step_s)
        step += 1
    return {"resumed_from": start, "final_step": step, "restart_count": job.restart_count,
            "job_id": job.job_id}


def signal_self(job: JobContext) -> dict[str, bool]:
    """Sends this process the preemption signal, as SLURM would, and reports whether the stop
    request became visible (it must, without the process being stopped).

    Returns {"before": stop_requested() before the signal, "after": after it}.
    """
    before = job.stop_requested()
    os.kill(os.getpid(), preempt_signal())
    deadline = time.monotonic() + 5.0
    while not job.stop_requested() and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"before": before, "after": job.stop_requested()}
