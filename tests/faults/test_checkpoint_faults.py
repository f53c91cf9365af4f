"""Faults around checkpoints and small records: a `latest` naming nothing, truncated shards,
the non-finite guard's save, NaN configs, truncated DONE.json / jobs.json. Each case checks
what the user sees and that no complete checkpoint or finished export was lost.

(kill -9 during a save on 2 DeepSpeed ranks: tests/integration/test_zero_resume.py.)
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pipeline.atomic import CorruptFileError
from pipeline.checkpoint import (
    Checkpointer,
    CheckpointError,
    RunFolder,
    remove_incomplete,
    resume,
    save_checkpoint,
)
from pipeline.dist import DistEnv
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import SINGLE_STATE_FILE, StrategyConfig, build_strategy
from tests.faults.conftest import assert_one_line_error, detrforge


def single(model: nn.Module):
    return build_strategy(StrategyConfig(kind="single", precision="fp32"), model,
                          OptimizerConfig(), 2, DistEnv(), total_steps=10)


def saved_run(tmp_path, steps=(2, 4)) -> RunFolder:
    """A run folder with a complete checkpoint at each of `steps`, `latest` at the last."""
    run = RunFolder(tmp_path / "stage")
    strategy = single(nn.Linear(3, 2))
    for step in steps:
        save_checkpoint(run, strategy, TrainState(step=step), keep_last=10)
    return run


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def resume_fresh(run: RunFolder) -> tuple[TrainState, object]:
    state = TrainState()
    _, outcome = resume(run, nn.Linear(3, 2), single, state)
    return state, outcome


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_complete(tmp_path, caplog):
    run = saved_run(tmp_path)
    run.latest_path.write_text("step_9\n")  # the folder was deleted by hand
    with caplog.at_level(logging.WARNING):
        state, outcome = resume_fresh(run)
    assert outcome.kind == "resume" and state.step == 4
    (message,) = warnings_of(caplog)
    assert "step_9" in message and "step_4" in message and "\n" not in message
    assert [p.name for p in run.complete_step_dirs()] == ["step_2", "step_4"]
    assert run.latest_name() == "step_4"  # a later save of step 9 is not mistaken for done


def test_truncated_shard_behind_complete_marker_resumes_from_the_older_one(tmp_path, caplog):
    run = saved_run(tmp_path)
    truncate(run.step_dir(4) / SINGLE_STATE_FILE)
    with caplog.at_level(logging.WARNING):
        state, _ = resume_fresh(run)
    assert state.step == 2
    (message,) = warnings_of(caplog)
    assert "skipped step_4" in message and "truncated" in message and "\n" not in message
    # Nothing deleted: the unloadable folder is kept aside, the good one is `latest`.
    assert (run.checkpoints_dir / "unloadable_step_4" / SINGLE_STATE_FILE).is_file()
    assert run.latest_name() == "step_2" and run.step_dir(2).is_dir()


def test_no_checkpoint_loads_is_one_line_naming_the_folder_and_deletes_nothing(tmp_path):
    run = saved_run(tmp_path)
    for step in (2, 4):
        truncate(run.step_dir(step) / SINGLE_STATE_FILE)
    with pytest.raises(CheckpointError) as error:
        resume_fresh(run)
    message = str(error.value)
    assert "\n" not in message and str(run.checkpoints_dir) in message
    assert "step_4" in message and "step_2" in message and "--force" in message
    assert [p.name for p in run.complete_step_dirs()] == ["step_2", "step_4"]


def test_without_latest_only_incomplete_folders_are_removed(tmp_path):
    run = saved_run(tmp_path)
    run.latest_path.unlink()
    run.step_dir(6).mkdir()  # a save killed before its COMPLETE marker
    assert remove_incomplete(run) == [run.step_dir(6)]
    assert [p.name for p in run.step_dirs()] == ["step_2", "step_4"]
    state, outcome = resume_fresh(run)  # a complete folder is resumed even without `latest`
    assert outcome.kind == "resume" and state.step == 4


def test_diverged_save_is_aside_never_latest_and_prunes_nothing(tmp_path):
    run = RunFolder(tmp_path / "stage")
    strategy = single(nn.Linear(3, 2))
    checkpointer = Checkpointer(run, strategy, keep_last=1)
    checkpointer.save(TrainState(step=4))
    with torch.no_grad():
        for param in strategy.module.parameters():
            param.fill_(float("nan"))
    diverged = checkpointer.save_diverged(TrainState(step=7))
    assert diverged == run.diverged_dir(7) and (diverged / "COMPLETE").is_file()
    assert run.latest_name() == "step_4" and run.step_dir(4).is_dir()
    assert run.step_dirs() == [run.step_dir(4)]
    state, _ = resume_fresh(run)
    assert state.step == 4  # a rerun starts from the good checkpoint


def test_nan_gradient_reaches_no_weight_and_the_guard_saves_aside(tmp_path):
    from pipeline.engine.callbacks import NonFiniteGuard, NonFiniteLossError
    from pipeline.engine.loop import fit

    run = RunFolder(tmp_path / "stage")
    model = nn.Linear(3, 1)
    model.weight.register_hook(lambda grad: grad * float("nan"))  # every gradient is NaN
    strategy = single(model)
    checkpointer = Checkpointer(run, strategy, keep_last=1)
    checkpointer.save(TrainState(step=0))
    before = [p.detach().clone() for p in model.parameters()]
    batches = [torch.randn(2, 3) for _ in range(8)]
    guard = NonFiniteGuard(3, save=checkpointer.save_diverged)
    with pytest.raises(NonFiniteLossError, match="diverged_step_0"):
        fit(lambda x: ((strategy.module(x) ** 2).mean(), {}), batches, strategy, [guard],
            TrainState(), max_steps=5)
    for got, old in zip(model.parameters(), before):
        assert torch.equal(got, old)
    assert run.latest_name() == "step_0" and run.diverged_dir(0).is_dir()


def test_nan_lr_is_a_config_error():
    from pipeline.config import ConfigError
    from stages import load_stage_config
    from tests.faults.conftest import BACKBONE_TINY

    with pytest.raises(ConfigError, match="optim.lr"):
        load_stage_config(BACKBONE_TINY, ["optim.lr=nan"])


def test_truncated_done_json_is_a_one_line_status_error(finished_pipeline):
    pipe, workdir = finished_pipeline
    done = workdir / "pipe" / "backbone" / "DONE.json"
    truncate(done)
    result = detrforge("status", pipe, "--workdir", workdir)
    assert_one_line_error(result, str(done), "corrupt", "--force")
    assert (workdir / "pipe" / "backbone" / "export" / "model.safetensors").is_file()


def test_truncated_jobs_json_is_a_one_line_error(tmp_path):
    from launch.graph import Pipeline
    from launch.slurm_submit import read_jobs

    jobs = tmp_path / "pipe" / "jobs.json"
    jobs.parent.mkdir()
    jobs.write_text('{"backbone": {"job_id": "12')
    with pytest.raises(CorruptFileError) as error:
        read_jobs(Pipeline("pipe", tmp_path / "pipe.yaml", []), tmp_path)
    assert str(jobs) in str(error.value) and "\n" not in str(error.value)
