"""A stage's MLflow side: its tracker re-attached to the right run, the lineage it records
(data sets read, parent model versions, a one-sentence description) and the registered version
of its export. ``stages/common.py`` calls these in its stage flow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Protocol

from pipeline import dist
from pipeline.checkpoint import ResumeOutcome
from pipeline.config import config_hash, to_dict
from pipeline.engine.state import TrainState
from pipeline.run_folder import RunFolder
from pipeline.tracking import (
    DESCRIPTION_TAG,
    PARENT_MODEL_TAG,
    Tracker,
    TrackingConfig,
    build_tracker,
    parent_models,
    recorded_run_id,
    run_description,
    shard_datasets,
    version_description,
)


class StageIdentity(Protocol):
    """What these functions need of a stage's context (``stages.common.StageContext``)."""

    workdir: Path
    pipeline: str
    stage: str
    parent_run_id: str | None
    model_name: str


def start_tracker(ctx: StageIdentity, cfg: Any, tracking: TrackingConfig, env: dist.DistEnv,
                   run: RunFolder, state: TrainState, outcome: ResumeOutcome,
                   derived: dict[str, Any]) -> Tracker:
    """The stage's tracker, re-attached to the run id a resumed checkpoint kept (or, when the run
    was created after that checkpoint, the one the run folder recorded)."""
    resume_id = state.extra.get("tracker_run_id")
    if outcome.kind == "resume" and not resume_id and dist.is_main():
        resume_id = recorded_run_id(run.root)
    tracker = build_tracker(tracking, ctx.workdir, env.rank, ctx.stage,
                            parent_run_id=ctx.parent_run_id,
                            resume_run_id=resume_id, run_folder=run.root,
                            tags={"detrforge.pipeline": ctx.pipeline, "detrforge.stage": ctx.stage,
                                  "detrforge.config_hash": config_hash(cfg)})
    if dist.is_main():
        state.extra["tracker_run_id"] = tracker.run_id
        if outcome.kind != "resume":
            tracker.log_params({**to_dict(cfg), "derived": derived})
            tracker.log_artifact(run.config_path)
            _log_lineage(ctx, cfg, tracker, derived.get("inputs"), outcome.kind)
    return tracker


def _stage_data(cfg: Any) -> list:
    shards = getattr(getattr(cfg, "data", None), "shards", None)
    return shard_datasets(shards) if shards else []


def _log_lineage(ctx: StageIdentity, cfg: Any, tracker: Tracker, inputs: dict | None,
                 start: str) -> None:
    """Datasets read, parent versions and a one-sentence description of the run."""
    datasets, parents = _stage_data(cfg), parent_models(ctx.workdir, ctx.pipeline, inputs)
    tracker.log_datasets(datasets)
    kind = type(cfg).__module__.rsplit(".", 1)[-1]
    max_steps = getattr(getattr(cfg, "train", None), "max_steps", 0)
    tags = {DESCRIPTION_TAG: run_description(ctx.stage, kind, ctx.pipeline, max_steps,
                                             datasets, parents, start)}
    if parents:
        tags[PARENT_MODEL_TAG] = ", ".join(parents)
    tracker.set_tags(tags)


def register_export(ctx: StageIdentity, cfg: Any, tracker, export_dir: Path, inputs: dict | None,
              metrics: dict[str, float], main_metric: str):
    """Register the stage's export as ``<pipeline>.<stage>`` with its lineage (rank 0)."""
    from pipeline.registry import register_model  # imports mlflow: only when registering

    parents = parent_models(ctx.workdir, ctx.pipeline, inputs)
    tags = {"config_hash": config_hash(cfg), "git_commit": git_commit(),
            "data_fingerprint": json.dumps(inputs or {}, sort_keys=True)[:500],
            PARENT_MODEL_TAG: ", ".join(parents) or "none"}
    description = version_description(ctx.stage, ctx.pipeline, _stage_data(cfg), main_metric,
                                      metrics, config_hash(cfg), parents)
    return register_model(tracker, export_dir, ctx.model_name, tags=tags, strict=False,
                          description=description,
                          model_tags={"detrforge.pipeline": ctx.pipeline,
                                      "detrforge.stage": ctx.stage,
                                      "detrforge.kind": type(cfg).__module__.rsplit(".", 1)[-1]})


def git_commit() -> str:
    """The project's commit, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
