"""`detrforge submit / status / cancel` on SLURM: a pipeline's stages as chained submitit jobs.

Every stage that is not up to date becomes one job running :class:`launch.job.StageJob` around
``launch.stage_main:run_stage`` (the same function the local executor runs), chained with
``afterok`` on the stage submitted before it, so the pipeline runs unattended and a failed stage
stops its dependants (``DependencyParameters=kill_invalid_depend`` cancels them at once; without
it they stay pending with reason DependencyNeverSatisfied). Job ids are kept in
``<workdir>/<pipeline>/jobs.json`` for ``status`` and ``cancel``.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

from launch.executors import (
    ClusterConfig,
    ExecutorError,
    folder_lock,
    load_cluster_config,
    make_executor,
)
from launch.graph import Pipeline, StageSpec, is_up_to_date, prepare_run_dir
from launch.job import StageJob
from launch.stage_main import stage_spec
from pipeline.atomic import read_json, write_json_atomic

JOBS_FILE = "jobs.json"
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")


def stage_cluster(cluster: ClusterConfig, spec: StageSpec) -> ClusterConfig:
    """One task per GPU on GPU clusters; on CPU-only partitions the stage's `processes`, spread
    evenly over the cluster file's nodes (2 processes on `nodes: 2`: one task per node)."""
    if cluster.gpus_per_node:
        return cluster
    if spec.processes % cluster.nodes:
        raise ExecutorError(f"stage {spec.name}: processes={spec.processes} cannot be spread "
                            f"evenly over nodes={cluster.nodes}; make it a multiple of the nodes")
    return dataclasses.replace(cluster, tasks_per_node=spec.processes // cluster.nodes)


def _jobs_path(pipeline: Pipeline, workdir: Path) -> Path:
    return Path(workdir) / pipeline.name / JOBS_FILE


def read_jobs(pipeline: Pipeline, workdir: Path) -> dict[str, dict]:
    path = _jobs_path(pipeline, workdir)
    if not path.is_file():
        return {}
    return read_json(path, what="SLURM job list",
                     fix="check the jobs with `squeue --me`, cancel them with `scancel`, then "
                         "delete that file")


def submit(pipeline: Pipeline, cluster_file: Path, workdir: Path, force: bool = False) -> int:
    """Queue every stage that is not up to date, each after the previous one (afterok)."""
    cluster = load_cluster_config(cluster_file)
    workdir = Path(workdir).resolve()
    warn_if_sqlite_store(pipeline, cluster, workdir)
    with folder_lock(workdir / pipeline.name, "detrforge submit"):
        return _submit_locked(pipeline, cluster, workdir, force)


def _submit_locked(pipeline: Pipeline, cluster: ClusterConfig, workdir: Path, force: bool) -> int:
    parent_id = _parent_run_id(pipeline, workdir)
    jobs = read_jobs(pipeline, workdir)
    active = _active_jobs(jobs)
    previous: str | None = None
    for spec in pipeline.stages:
        if spec.name in active:
            # A second job would write the same run folder; chain the next stages after it.
            previous = active[spec.name]
            print(f"  {spec.name:16s} already queued or running as job {previous}, kept")
            continue
        if not force and is_up_to_date(pipeline, spec, workdir):
            print(f"  {spec.name:16s} up to date, skipped")
            continue
        jobs[spec.name] = _submit_stage(pipeline, spec, cluster, workdir, parent_id, previous, force)
        previous = jobs[spec.name]["job_id"]
        # Written after every job, so a submission that fails half-way leaves the ids of the
        # jobs it did queue for `status` and `cancel`.
        write_json_atomic(_jobs_path(pipeline, workdir), jobs)
        print(f"  {spec.name:16s} job {previous}" + (f" (after {jobs[spec.name]['after']})"
                                                     if jobs[spec.name]["after"] else ""))
    print(f"follow with: detrforge status {pipeline.path} --workdir {workdir}")
    return 0


def _submit_stage(pipeline: Pipeline, spec: StageSpec, cluster: ClusterConfig, workdir: Path,
                  parent_id: str | None, after: str | None, force: bool) -> dict:
    """One stage's job (after job ``after``, if any); returns its jobs.json record."""
    run_dir = pipeline.run_dir(workdir, spec.name)
    # A job or a local run may still work there (its lock says so): archive only a free folder.
    with folder_lock(run_dir, "detrforge submit (archiving)"):
        prepare_run_dir(pipeline, spec, workdir, force)
    run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor("slurm", workdir / pipeline.name / ".submitit" / "%j",
                             stage_cluster(cluster, spec), job_name=f"{pipeline.name}.{spec.name}",
                             dependency=f"afterok:{after}" if after else None)
    job = executor.submit(StageJob("launch.stage_main:run_stage",
                                   {"spec": stage_spec(pipeline, spec, workdir, parent_id)},
                                   run_dir, cluster.max_requeues))
    return {"job_id": str(job.job_id), "submitted_at": time.time(),
            "log_folder": str(Path(job.paths.stderr).parent), "after": after}


def warn_if_sqlite_store(pipeline: Pipeline, cluster: ClusterConfig, workdir: Path) -> None:
    """One line when jobs would track into a SQLite file: its locking does not hold on the shared
    file systems of clusters, and ranks on several nodes write to it at once."""
    from pipeline.tracking import tracking_uri_for

    for spec in pipeline.stages:
        tracking = getattr(spec.cfg, "tracking", None)
        if tracking is None or not tracking.enabled:
            continue
        uri = tracking_uri_for(workdir, tracking)
        if uri.startswith("sqlite:"):
            nodes = f" on {cluster.nodes} nodes" if cluster.nodes > 1 else ""
            print(f"detrforge: warning: SLURM jobs{nodes} will track into the SQLite store {uri}, "
                  "whose locking fails on shared file systems; set MLFLOW_TRACKING_URI (or "
                  "tracking.tracking_uri) to an MLflow server with a database backend",
                  file=sys.stderr)
            return


def _active_jobs(jobs: dict[str, dict]) -> dict[str, str]:
    """stage -> job id of the recorded jobs that SLURM still queues or runs."""
    if not jobs:
        return {}
    try:
        states = slurm_states([job["job_id"] for job in jobs.values()])
    except (OSError, subprocess.SubprocessError) as err:
        raise ExecutorError(f"cannot ask SLURM about the jobs in {JOBS_FILE} ({err}); is this a "
                            "SLURM login node, with SLURM_CONF set for a local cluster?") from None
    return {stage: job["job_id"] for stage, job in jobs.items()
            if states.get(job["job_id"], ("UNKNOWN", ""))[0] in ACTIVE_STATES}


def _parent_run_id(pipeline: Pipeline, workdir: Path) -> str | None:
    """The pipeline's MLflow run: created at submission, the stage runs become its children."""
    from pipeline.tracking import start_parent_run

    tracking = getattr(pipeline.stages[0].cfg, "tracking", None)
    if tracking is None or not tracking.enabled:
        return None
    parent = start_parent_run(tracking, workdir, 0, pipeline.name, tags={"detrforge.executor": "slurm"})
    run_id = parent.run_id
    parent.finish("FINISHED")
    return run_id


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) from sacct (it also knows finished and cancelled jobs)."""
    if not job_ids:
        return {}
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,Reason", "-j",
                          ",".join(job_ids)], capture_output=True, text=True, timeout=30)
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 2:
            states[parts[0]] = (parts[1].split()[0], parts[2] if len(parts) > 2 else "")
    unknown = [job_id for job_id in job_ids if job_id not in states]
    if unknown:  # accounting lags behind the controller: a job queued a moment ago is not in it
        states.update(_squeue_states(unknown))
    return states


def _squeue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) from the controller itself (squeue knows queued jobs at once)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=30)
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def squeue_reasons(job_ids: list[str]) -> dict[str, str]:
    """job id -> reason from squeue, which names why a dependant was cancelled
    (DependencyNeverSatisfied) where sacct only says "Dependency"; it forgets finished jobs
    after MinJobAge (300 s by default)."""
    if not job_ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%r", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=30)
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")


def _error_line(job: dict) -> str:
    """What went wrong in a failed job: the exception its traceback ends with (any rank), else
    the last line that mentions an error."""
    logs = sorted(Path(job.get("log_folder", "")).glob(f"{job['job_id']}_*_log.err"))
    lines = [line.strip() for log in logs for line in log.read_text(errors="replace").splitlines()]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    errors = exceptions or [line for line in lines if "Error" in line or "error:" in line]
    return errors[-1][:300] if errors else ""


def slurm_nodes(job_ids: list[str]) -> dict[str, str]:
    """job id -> the (compressed) node list its last attempt ran on, e.g. "n[1-2]"; absent for
    jobs that never got nodes."""
    if not job_ids:
        return {}
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,NodeList", "-j",
                          ",".join(job_ids)], capture_output=True, text=True, timeout=30)
    pairs = (line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)
    return {job_id: nodes for job_id, nodes in pairs if nodes and nodes != "None assigned"}


def job_states(pipeline: Pipeline, workdir: Path) -> dict[str, str]:
    """stage -> "job ID STATE on NODES (reason)", for `detrforge status`."""
    jobs = read_jobs(pipeline, workdir)
    ids = [j["job_id"] for j in jobs.values()]
    try:
        states, reasons, nodes = slurm_states(ids), squeue_reasons(ids), slurm_nodes(ids)
    except (OSError, subprocess.SubprocessError):
        states, reasons, nodes = {}, {}, {}
    return {stage: _describe(job, states, reasons, nodes.get(job["job_id"]))
            for stage, job in jobs.items()}


def _describe(job: dict, states: dict[str, tuple[str, str]], reasons: dict[str, str],
              nodes: str | None = None) -> str:
    state, reason = states.get(job["job_id"], ("UNKNOWN", ""))
    reason = reasons.get(job["job_id"]) or reason
    after_state = states.get(job.get("after") or "", ("UNKNOWN", ""))[0]
    # Only a pending job's reason is current: sacct keeps the last pending reason
    # ("Dependency") of a job that ran or was cancelled since, and squeue, which says
    # DependencyNeverSatisfied, forgets finished jobs after a few minutes.
    parent_failed = state == "CANCELLED" and bool(job.get("after")) and (
        reason == "DependencyNeverSatisfied"
        or (reason == "Dependency" and job["job_id"] not in reasons
            and after_state not in ("COMPLETED", "UNKNOWN")))
    text = f"job {job['job_id']} {state}" + (f" on {nodes}" if nodes else "")
    if state == "PENDING" and reason not in ("", "None", "(null)"):
        text += f" ({reason})"
    if state.startswith(("FAILED", "NODE_FAIL", "OUT_OF_MEMORY")):
        text += f": {_error_line(job)}"
    elif parent_failed:
        text += f" (DependencyNeverSatisfied): its dependency job {job['after']} did not succeed"
    return text


def cancel(pipeline: Pipeline, workdir: Path) -> int:
    """scancel every queued or running job of the pipeline."""
    with folder_lock(Path(workdir) / pipeline.name, "detrforge cancel"):
        return _cancel_locked(pipeline, workdir)


def _cancel_locked(pipeline: Pipeline, workdir: Path) -> int:
    jobs = read_jobs(pipeline, workdir)
    states = slurm_states([j["job_id"] for j in jobs.values()])
    active = [j["job_id"] for j in jobs.values()
              if states.get(j["job_id"], ("UNKNOWN", ""))[0] in ACTIVE_STATES]
    if not active:
        print(f"nothing queued or running for pipeline {pipeline.name}")
        return 0
    subprocess.run(["scancel", *active], check=True, timeout=30)
    print(f"cancelled jobs {', '.join(active)}")
    return 0
