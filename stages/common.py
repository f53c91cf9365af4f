"""What every stage shares: its context, the training config, and the one stage flow.

A stage module is wiring: it builds a model, a loader, a ten-line ``task_step`` and an
``evaluate`` function, and hands them to :func:`train_stage`, which owns the rest in the same
order for every stage, each piece built after what it needs: distributed setup -> parts ->
strategy through the resume order (own ``latest``, else ``init_from``, else scratch) ->
resolved config with derived values -> tracker (re-attached by the run id the checkpoint kept)
-> callbacks -> their checkpointed state, by name -> the engine's ``fit`` -> final evaluation
-> export -> ``DONE.json`` -> registered model.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import dist
from pipeline.atomic import read_json, write_json_atomic
from pipeline.checkpoint import Checkpointer, ResumeOutcome, resume
from pipeline.checkpoint_elastic import WorldChange, record_world_change
from pipeline.config import config_hash, to_dict, unhashed_field, write_resolved
from pipeline.engine.callbacks import (
    Callback,
    MetricLogger,
    NonFiniteGuard,
    PeriodicCheckpoint,
    PeriodicEval,
    ProgressBar,
    SaveFn,
    StopOnRequest,
    stateful_callbacks,
)
from pipeline.engine.loop import fit
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import Strategy, StrategyConfig, build_strategy
from pipeline.export import write_export
from pipeline.run_folder import RunFolder
from pipeline.tracking import (
    Tracker,
    TrackingConfig,
)
from stages.ema import EmaUpdate, StageEmaConfig, with_ema
from stages.stage_tracking import register_export, start_tracker

log = logging.getLogger("detrforge.stage")


class StageError(RuntimeError):
    """A stage cannot run as configured; the message names the setting to fix."""


@dataclass
class TrainConfig:
    """The training loop's budget and rhythm."""

    max_steps: int = 100  # optimizer steps of the stage
    log_every: int = 10  # steps between logged metric means
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    checkpoint_every: int = 50  # steps between checkpoints (one is always saved at the end)
    keep_last: int = 2  # step checkpoints kept on disk
    seed: int = 0  # seeds model init, data order and augmentation
    processes: int = 1  # ranks `detrforge run` starts on this machine (SLURM: the cluster file)
    max_nonfinite_in_a_row: int = 5  # non-finite losses in a row before the stage stops
    progress_bar: bool = True  # rank 0 shows step, loss, lr, images/s, ETA
    ema: StageEmaConfig = field(default_factory=StageEmaConfig)  # weight EMA (stages/ema.py)
    # Resume a checkpoint written by another number of ranks: data position, global batch and
    # peak lr re-derived, the change recorded in world_changes.json. Not in the config hash:
    # switching it on to resume keeps the run folder.
    elastic_resume: bool = unhashed_field(default=False)

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every", "checkpoint_every", "keep_last", "processes",
                     "max_nonfinite_in_a_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0, got {self.eval_every}")


@dataclass
class StageContext:
    """Where a stage runs: its pipeline, its run folder, the MLflow parent run."""

    workdir: Path  # everything a run writes lives under it
    pipeline: str  # pipeline name (the run folder's parent, the registered model's prefix)
    stage: str  # stage name inside the pipeline
    parent_run_id: str | None = None  # MLflow run of the pipeline invocation
    stop_file: Path | None = None  # a stop request (preemption) appears here

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.pipeline / self.stage

    @property
    def model_name(self) -> str:
        return f"{self.pipeline}.{self.stage}"


@dataclass
class StageResult:
    """How a stage ended, as the pipeline summary shows it."""

    stage: str
    status: str  # "done" | "stopped" (a stop was requested; resume continues it)
    metrics: dict[str, float] = field(default_factory=dict)
    main_metric: str = ""
    export_dir: str | None = None
    run_id: str | None = None
    model_version: int | None = None
    start: str = "scratch"  # resume order branch: "resume" | "init_from" | "scratch"
    seconds: float = 0.0


@dataclass
class StageParts:
    """What a stage module hands to :func:`train_stage`."""

    model: nn.Module
    loader: Any  # resumable batch iterable with state_dict()/load_state_dict()
    task_step: Callable[[Strategy, TrainState, Any], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[Strategy], dict[str, float]]  # every rank calls it; same dict on all
    micro_batch_size: int
    main_metric: str  # key of evaluate()'s dict shown in the summary
    meta: dict[str, Any]  # export meta: architecture config, class names...
    images_per_step: int | None = None
    group_of: Callable[[str], str] | None = None  # optimiser group per parameter (model.param_group)
    init_from: Path | None = None  # export folder whose weights start the model (resume order 2)
    prefix_map: dict[str, str] | None = None  # key renames for init_from
    export_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


def seed_everything(seed: int) -> None:
    """Same model init on every rank (DeepSpeed also broadcasts rank 0's weights)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_done(run_dir: Path) -> dict | None:
    """The DONE.json record of a finished stage, or None; a corrupt one is a CorruptFileError
    naming it (the export next to it is kept: rerunning the stage archives the folder)."""
    path = RunFolder(run_dir).done_path
    if not path.is_file():
        return None
    return read_json(path, what="stage record",
                     fix="rerun the stage with `detrforge run ... --only STAGE --force` (the "
                         "folder is archived, not deleted), or delete that file")


def _write_done(run_dir: Path, record: dict) -> None:
    write_json_atomic(RunFolder(run_dir).done_path, record)


def _callbacks(ctx: StageContext, train: TrainConfig, parts: StageParts, strategy: Strategy,
               tracker: Tracker, save: SaveFn, save_diverged: SaveFn,
               ema: EmaUpdate | None = None) -> list[Callback]:
    """The hooks, in the order they run at each step (EMA, evaluation, then the step's save)."""
    stop = StopOnRequest(ctx.stop_file)
    stop.install_signal_handlers()
    callbacks: list[Callback] = [MetricLogger(tracker, every_steps=train.log_every),
                                 *([ema] if ema is not None else [])]
    if train.eval_every:
        callbacks.append(PeriodicEval(
            lambda state: _eval_and_log(parts, strategy, tracker, state.step, ctx.run_dir),
            train.eval_every))
    callbacks += [NonFiniteGuard(train.max_nonfinite_in_a_row, save=save_diverged),
                  PeriodicCheckpoint(save, train.checkpoint_every, at_end=True), stop]
    if train.progress_bar and dist.is_main():
        callbacks.append(ProgressBar(train.max_steps, parts.images_per_step))
    return callbacks


def _final_metrics(callbacks: list[Callback], step: int) -> dict[str, float] | None:
    """The periodic evaluation's result when it already ran at the last step (no second run)."""
    for callback in callbacks:
        if isinstance(callback, PeriodicEval):
            saved = callback.state_dict()
            return dict(saved["last"]) if saved["last_step"] == step and saved["last"] else None
    return None


def _with_group_lrs(step_out: tuple[torch.Tensor, dict[str, float]], strategy: Strategy):
    """Add `lr/<group>` (one per optimiser group, decay and no-decay halves share it)."""
    loss, metrics = step_out
    optimizer = getattr(getattr(strategy, "engine", None), "optimizer", None) or getattr(
        strategy, "optimizer", None)
    for index, group in enumerate(getattr(optimizer, "param_groups", None) or []):
        name = str(group.get("name", f"group_{index}")).removesuffix("_no_decay")
        metrics[f"lr/{name.removesuffix('_decay')}"] = float(group["lr"])
    return loss, metrics


def _eval_and_log(parts: StageParts, strategy: Strategy, tracker, step: int,
                  run_dir: Path) -> dict[str, float]:
    _share_rank0_buffers(strategy.module)
    strategy.eval()
    with torch.no_grad():
        metrics = parts.evaluate(strategy)
    strategy.train()
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
    if dist.is_main():
        _log_evaluation_pictures(RunFolder(run_dir), tracker, step)
    return metrics


def _log_evaluation_pictures(run: RunFolder, tracker, step: int) -> None:
    """Copy what this evaluation drew (pictures of the same validation images each time, the
    inspector report) to `artifacts/evaluations/step_<N>/` and log that copy to MLflow now, so
    progress is visible while the stage trains. A copy, because the next evaluation overwrites
    the pictures and the tracker sends artifacts from its own thread, later."""
    drawn = [p for p in run.artifacts_dir.glob("*") if p.is_dir() and p != run.evaluations_dir] \
        if run.artifacts_dir.is_dir() else []
    if not drawn:
        return
    snapshot = run.evaluation_dir(step)
    shutil.rmtree(snapshot, ignore_errors=True)  # a resumed run evaluates this step again
    for folder in drawn:
        shutil.copytree(folder, snapshot / folder.name)
    tracker.log_artifacts(snapshot, snapshot.relative_to(run.root).as_posix())


def _share_rank0_buffers(module: nn.Module) -> None:
    """Every rank evaluates with rank 0's buffers (BatchNorm statistics), the ones exported.

    Each rank updates its running statistics from its own batches, and a checkpoint keeps rank
    0's only, so after a resume the other ranks' statistics differ from an uninterrupted run's:
    their share of the evaluation would then differ too.
    """
    if dist.get_world_size() > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def train_stage(ctx: StageContext, cfg: Any, train: TrainConfig, optim: OptimizerConfig,
                strategy_cfg: StrategyConfig, tracking: TrackingConfig,
                build_parts: Callable[[dist.DistEnv], StageParts],
                inputs: dict[str, str] | None = None) -> StageResult:
    """Run one stage to its end (or to an agreed stop) on every rank of this job."""
    started = time.time()
    env = dist.read_dist_env()
    if env.is_distributed and not dist.is_initialized():
        dist.init_distributed(env)
    seed_everything(train.seed)
    run = RunFolder(ctx.run_dir)
    _prepare_run_folder(ctx, run)
    parts = build_parts(env)
    state = TrainState()

    # optim.scale_lr_with_batch: lr for this run's global batch (param_groups in derived show it).
    scaled = optim.for_global_batch(_global_batch(parts, env.world_size, strategy_cfg))

    def make_strategy(model: nn.Module) -> Strategy:
        return build_strategy(strategy_cfg, model, scaled, parts.micro_batch_size, env,
                              total_steps=train.max_steps, group_of=parts.group_of)

    strategy, outcome = resume(run, parts.model, make_strategy, state, loader=parts.loader,
                               init_from=parts.init_from, prefix_map=parts.prefix_map,
                               elastic=train.elastic_resume)
    derived = derived_values(env, parts, strategy, inputs)
    if dist.is_main():
        print(f"[{ctx.stage}] {outcome}", flush=True)
        write_resolved(cfg, run.config_path, extra=derived)
    tracker = start_tracker(ctx, cfg, tracking, env, run, state, outcome, derived)
    if outcome.world_changed:
        _record_world_change(run, outcome, state.step, parts, strategy_cfg, optim, strategy,
                             tracker)
    checkpointer = Checkpointer(run, strategy, loader=parts.loader, keep_last=train.keep_last)
    ema, parts = with_ema(train.ema, strategy.module, parts, tracker, state)
    callbacks = _callbacks(ctx, train, parts, strategy, tracker, checkpointer.save,
                           checkpointer.save_diverged, ema)
    named = stateful_callbacks(callbacks)
    checkpointer.track(named)
    outcome.restore(named)
    try:
        result = fit(lambda batch: _with_group_lrs(parts.task_step(strategy, state, batch),
                                                   strategy), parts.loader,
                     strategy, callbacks, state, train.max_steps, save=checkpointer.save)
    except BaseException:
        tracker.finish("FAILED")  # the checkpoints stay; a rerun resumes from `latest`
        raise
    if result.stopped:
        tracker.flush()
        return StageResult(ctx.stage, "stopped", start=outcome.kind, run_id=tracker.run_id,
                           seconds=time.time() - started)
    metrics = _final_metrics(callbacks, state.step) or _eval_and_log(parts, strategy, tracker,
                                                                      state.step, ctx.run_dir)
    stage_result = _finish(ctx, cfg, parts, strategy, tracker, metrics, outcome.kind, inputs)
    stage_result.seconds = time.time() - started
    dist.barrier()
    return stage_result


def _global_batch(parts: StageParts, world_size: int, strategy_cfg: StrategyConfig) -> int:
    return parts.micro_batch_size * world_size * strategy_cfg.grad_accum_steps


def _record_world_change(run: RunFolder, outcome: ResumeOutcome, step: int, parts: StageParts,
                         strategy_cfg: StrategyConfig, optim: OptimizerConfig,
                         strategy: Strategy, tracker: Tracker) -> None:
    """world_changes.json, one warning and a tracker tag for an elastic resume (rank 0)."""
    old, new = outcome.saved_world_size, dist.get_world_size()
    old_batch, new_batch = (_global_batch(parts, n, strategy_cfg) for n in (old, new))
    record_world_change(run, WorldChange(
        step=step, checkpoint=outcome.path.name, old_world_size=old, new_world_size=new,
        old_global_batch=old_batch, new_global_batch=new_batch,
        old_peak_lr=optim.scaled_lr(old_batch), new_peak_lr=optim.scaled_lr(new_batch),
        lr=strategy.lr))
    tracker.set_tags({"detrforge.elastic_resume": f"step {step}: {old} -> {new} ranks"})


def _prepare_run_folder(ctx: StageContext, run: RunFolder) -> None:
    """Rank 0 makes the folders and drops a stop request an earlier attempt already honoured."""
    if dist.is_main():
        run.create()
        if ctx.stop_file is not None:
            Path(ctx.stop_file).unlink(missing_ok=True)
    dist.barrier()


def derived_values(env: dist.DistEnv, parts: StageParts, strategy: Strategy,
                   inputs: dict[str, str] | None) -> dict[str, Any]:
    """What the config implies but does not spell: written under config.yaml's `derived:`."""
    return {
        "world_size": env.world_size,
        "micro_batch_size": parts.micro_batch_size,
        "grad_accum_steps": strategy.grad_accum_steps,
        "global_batch_size": parts.micro_batch_size * env.world_size * strategy.grad_accum_steps,
        "param_groups": strategy.param_groups,
        "deepspeed": strategy.deepspeed_config,
        "inputs": inputs or {},
    }


def _finish(ctx: StageContext, cfg: Any, parts: StageParts, strategy: Strategy, tracker,
            metrics: dict[str, float], start: str, inputs: dict | None) -> StageResult:
    """Export (every rank gathers ZeRO shards), then rank 0 writes, registers and records."""
    state_dict = strategy.consolidated_state_dict()
    if parts.export_state is not None:
        state_dict = parts.export_state(state_dict)
    result = StageResult(ctx.stage, "done", metrics=metrics, main_metric=parts.main_metric,
                         start=start, run_id=tracker.run_id)
    if not dist.is_main():
        return result
    run = RunFolder(ctx.run_dir)
    export_dir = run.export_dir
    meta = {**parts.meta, "metrics": metrics, "config_hash": config_hash(cfg),
            "config": to_dict(cfg), "parents": inputs or {}, "stage": ctx.stage,
            "pipeline": ctx.pipeline}
    write_export(export_dir, state_dict, meta)
    result.export_dir = str(export_dir)
    for folder in sorted(run.artifacts_dir.glob("*")):  # the last evaluation's pictures
        if folder.is_dir() and folder != run.evaluations_dir:  # (logged at each evaluation)
            tracker.log_artifacts(folder, folder.relative_to(run.root).as_posix())
    result.model_version = register_export(ctx, cfg, tracker, export_dir, inputs, metrics,
                                     parts.main_metric)
    tracker.finish("FINISHED")
    _write_done(ctx.run_dir, {
        "stage": ctx.stage, "config_hash": config_hash(cfg), "inputs": inputs or {},
        "metrics": metrics, "main_metric": parts.main_metric, "mlflow_run_id": tracker.run_id,
        "registered_model": ctx.model_name if result.model_version else None,
        "model_version": result.model_version, "finished_at": time.time(),
    })
    return result
