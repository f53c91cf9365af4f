"""The local executor: run a pipeline's stages in order on this machine, skip what is done.

Each stage runs in its own process group (``torch.distributed.run`` for several ranks), so a
stage's memory, threads and process group end with it, and the same ``run_stage`` serves the
local executor and SLURM jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import configs
from launch.executors import folder_lock
from launch.graph import (
    Pipeline,
    StageSpec,
    is_up_to_date,
    load_target,
    prepare_run_dir,
    stage_status,
)
from launch.stage_main import RESULT_FILE, stage_spec
from launch.summary import write_reports
from pipeline.run_folder import RunFolder
from stages.common import read_done

CONFIGS_DIR = Path(configs.__file__).resolve().parent
DEMO_PIPELINE = CONFIGS_DIR / "pipelines" / "demo.yaml"
# Where the shipped tiny recipes read the sample sets (their data.shards, relative to themselves).
SAMPLES_DIR = CONFIGS_DIR.parent / "data" / "samples"


def select_stages(pipeline: Pipeline, only: str | None, from_stage: str | None) -> list[StageSpec]:
    if only:
        return pipeline.instances(only)
    if from_stage:
        from_stage = pipeline.instances(from_stage)[0].name
        names = [s.name for s in pipeline.stages]
        return pipeline.stages[names.index(from_stage):]
    return list(pipeline.stages)


def stage_command(spec: StageSpec, spec_file: Path) -> list[str]:
    if spec.processes <= 1:
        return [sys.executable, "-m", "launch.stage_main", str(spec_file)]
    # Without --log-dir, torch.distributed.run leaves a torchelastic_* folder in the system's
    # temporary folder after every run; in the run folder its error files stay with the stage.
    logs = RunFolder(spec_file.parent).torchrun_logs_dir
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--log-dir={logs}",
            f"--nproc_per_node={spec.processes}", "-m", "launch.stage_main", str(spec_file)]


def run_one_stage(pipeline: Pipeline, spec: StageSpec, workdir: Path, parent_run_id: str | None) -> dict:
    run_dir = pipeline.run_dir(workdir, spec.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file = run_dir / "stage_spec.json"
    spec_file.write_text(json.dumps(stage_spec(pipeline, spec, workdir, parent_run_id), indent=2))
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    print(f"\n=== stage {spec.name} ({spec.kind}, {spec.processes} process"
          f"{'es' if spec.processes > 1 else ''}) -> {run_dir}", flush=True)
    started = time.time()
    # HF_HUB_OFFLINE is the user's: only backbone.pretrained: true downloads (timm's weights).
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    code = subprocess.run(stage_command(spec, spec_file), env=env).returncode
    result_file = run_dir / RESULT_FILE
    if code != 0 or not result_file.is_file():
        return {"stage": spec.name, "status": "failed", "seconds": time.time() - started,
                "exit_code": code}
    result = json.loads(result_file.read_text())
    result["seconds"] = time.time() - started
    return result


def run_target(target: str | Path, overrides: list[str], workdir: Path, force: bool = False,
               only: str | None = None, from_stage: str | None = None) -> int:
    """`detrforge run`: every selected stage in order; stops at the first failure."""
    pipeline = load_target(target, overrides)
    selected = select_stages(pipeline, only, from_stage)
    workdir.mkdir(parents=True, exist_ok=True)
    # One `run` or `submit` of a pipeline at a time; a stage's own process (or SLURM job) holds
    # its run folder's lock while it trains, so archiving one (`--force`) waits for it to be free.
    with folder_lock(workdir / pipeline.name, "detrforge run"):
        return _run_locked(pipeline, selected, workdir, force)


def _run_locked(pipeline: Pipeline, selected: list[StageSpec], workdir: Path, force: bool) -> int:
    parent = _start_parent(pipeline, workdir)
    rows = []
    for spec in selected:
        if not force and is_up_to_date(pipeline, spec, workdir):
            done = read_done(pipeline.run_dir(workdir, spec.name)) or {}
            rows.append({**done, "stage": spec.name, "status": "skipped (up to date)"})
            continue
        with folder_lock(pipeline.run_dir(workdir, spec.name), "detrforge run (archiving)"):
            prepare_run_dir(pipeline, spec, workdir, force)
        result = run_one_stage(pipeline, spec, workdir, parent.run_id if parent else None)
        rows.append(result)
        if result["status"] != "done":
            break
    failed = any(r["status"] in ("failed", "stopped") for r in rows)
    reports = write_reports(pipeline, rows, workdir)  # summary.md|json, curves.md|json|png
    if parent is not None:
        for report in reports:
            parent.log_artifact(report)
        parent.finish("FAILED" if failed else "FINISHED")
    print_summary(pipeline, rows, workdir)
    return 1 if failed else 0


def _start_parent(pipeline: Pipeline, workdir: Path):
    from pipeline.tracking import start_parent_run

    tracking = getattr(pipeline.stages[0].cfg, "tracking", None)
    if tracking is None or not tracking.enabled:
        return None
    return start_parent_run(tracking, workdir, 0, pipeline.name,
                            tags={"detrforge.pipeline_file": str(pipeline.path)})


def _metric_text(row: dict) -> str:
    key = row.get("main_metric") or ""
    metrics = row.get("metrics") or {}
    return f"{key} {metrics[key]:.3f}" if key in metrics else "-"


def _name_width(names) -> int:
    """The stage column's width: long seeded names (dino_varifocal_600_s0) stay aligned."""
    return max([14, *(len(name) for name in names)])


def print_summary(pipeline: Pipeline, rows: list[dict], workdir: Path) -> None:
    print(f"\npipeline {pipeline.name}  (workdir {workdir})")
    width = _name_width(row["stage"] for row in rows)
    print(f"{'stage':{width}s} {'status':22s} {'time':>8s}  {'main metric':18s} registered model")
    for row in rows:
        seconds = row.get("seconds")
        took = f"{seconds:7.0f}s" if isinstance(seconds, (int, float)) else "       -"
        version = row.get("model_version")
        model = f"{pipeline.name}.{row['stage']} v{version}" if version else "-"
        print(f"{row['stage']:{width}s} {row['status']:22s} {took}  {_metric_text(row):18s} {model}")
    print(f"MLflow: detrforge ui --workdir {workdir}   (it prints each experiment's link)")


def show_status(target: str | Path, workdir: Path) -> int:
    """`detrforge status`: each stage's state, checkpoint step and last metrics, SLURM jobs."""
    pipeline = load_target(target, [])
    jobs = _slurm_jobs(pipeline, workdir)
    print(f"pipeline {pipeline.name}  (workdir {workdir})")
    width = _name_width(spec.name for spec in pipeline.stages)
    for spec in pipeline.stages:
        status = stage_status(pipeline, spec, workdir)
        step = f"step {status['checkpoint_step']}/{status['max_steps']}" if status[
            "checkpoint_step"] else ""
        done = status["done"] or {}
        metric = _metric_text(done) if done else ""
        job = jobs.get(spec.name, "")
        print(f"  {spec.name:{width}s} {status['state']:12s} {step:16s} {metric:16s} {job}")
    return 0


def _slurm_jobs(pipeline: Pipeline, workdir: Path) -> dict[str, str]:
    """Job id and state of each submitted stage (launch.slurm_submit writes jobs.json)."""
    try:
        from launch.slurm_submit import job_states
    except ImportError:
        return {}
    return job_states(pipeline, workdir)


def run_demo(workdir: Path) -> int:
    """`make demo`: sample data if missing, then the demo pipeline on the embedded defaults."""
    from pipeline.data.samples import make_samples, samples_are_current

    if not samples_are_current(SAMPLES_DIR):
        print(f"generating the sample data sets in {SAMPLES_DIR} ...", flush=True)
        make_samples(SAMPLES_DIR, size="small", seed=0, workers=2, progress=True)
    return run_target(DEMO_PIPELINE, [], workdir)


def submit_pipeline(target: str | Path, cluster: Path, workdir: Path) -> int:
    from launch.slurm_submit import submit

    return submit(load_target(target, []), cluster, workdir)


def cancel_pipeline(target: str | Path, workdir: Path) -> int:
    from launch.slurm_submit import cancel

    return cancel(load_target(target, []), workdir)
