"""Entry point of one stage process: ``python -m launch.stage_main SPEC.json``.

The local executor starts it once per rank (``torch.distributed.run`` for several ranks), the
SLURM job calls :func:`run_stage` directly. Either way the same function runs the stage, so a
stage behaves the same on a laptop and on a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from launch.errors import is_user_error, one_line
from launch.executors import folder_lock
from launch.graph import Pipeline, StageSpec, data_shards
from pipeline import dist
from pipeline.atomic import write_json_atomic
from pipeline.run_folder import RunFolder
from stages import load_stage_config, stage_module
from stages.common import StageContext
from stages.inputs import input_fingerprints

RESULT_FILE = "result.json"


def stage_spec(pipeline: Pipeline, spec: StageSpec, workdir: Path,
               parent_run_id: str | None) -> dict[str, Any]:
    """What a stage process needs, as plain JSON: the file ``main`` reads, the SLURM job's
    argument. Its paths are absolute (the overrides' too), so the stage loads the same config
    in any working folder."""
    return {"recipe": str(spec.recipe), "overrides": spec.overrides,
            "workdir": str(Path(workdir).resolve()), "pipeline": pipeline.name,
            "stage": spec.name, "parent_run_id": parent_run_id, "depends_on": spec.depends_on,
            "data_shards": data_shards(spec.cfg), "processes": spec.processes}


def run_stage(spec: dict[str, Any], job: Any = None) -> dict[str, Any]:
    """Run the stage described by ``spec`` (see :func:`stage_spec`) on this rank.

    Rank 0 holds the run folder's lock meanwhile (with the SLURM job id in a job); when another
    live holder has it, rank 0 fails at once and torchrun or srun (--kill-on-bad-exit) stops the
    other ranks, which would otherwise wait for it in the rendezvous.
    """
    lock = None
    if dist.read_dist_env().rank == 0:
        lock = folder_lock(Path(spec["workdir"]) / spec["pipeline"] / spec["stage"],
                           f"stage {spec['stage']}")
        lock.acquire()
    try:
        return _run_stage(spec, job)
    finally:
        if lock is not None:
            lock.release()


def _run_stage(spec: dict[str, Any], job: Any = None) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _use_granted_cpus()
    kind, cfg = load_stage_config(spec["recipe"], spec["overrides"])
    run_dir = Path(spec["workdir"]) / spec["pipeline"] / spec["stage"]
    stop_file = Path(job.stop_file) if job is not None else RunFolder(run_dir).stop_path
    ctx = StageContext(Path(spec["workdir"]), spec["pipeline"], spec["stage"],
                       parent_run_id=spec.get("parent_run_id"), stop_file=stop_file)
    inputs = input_fingerprints(ctx.workdir, ctx.pipeline, spec.get("depends_on") or [],
                                spec.get("data_shards"), cfg=cfg,
                                processes=spec.get("processes"))
    result = stage_module(kind).run(cfg, ctx, inputs)
    record = asdict(result)
    if dist.is_main():
        write_json_atomic(run_dir / RESULT_FILE, record)
    dist.shutdown()
    return record


def _use_granted_cpus() -> None:
    """In a SLURM task, one torch thread per CPU granted to it (``cpus_per_task``).

    Without binding (``TaskPlugin=task/none``) torch would start one thread per core of the node
    in every rank, oversubscribing it; torchrun does the same for local ranks (OMP_NUM_THREADS=1).
    The thread count also decides how CPU kernels split their sums, so equal counts keep a SLURM
    run and a local run of a stage equal.
    """
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(cpus))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    try:
        record = run_stage(spec)
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"detrforge: stage {spec['stage']} failed: {one_line(err)}", file=sys.stderr)
        return 2
    return 0 if record["status"] in ("done", "stopped") else 1


if __name__ == "__main__":
    dist.exit_without_teardown(main())
