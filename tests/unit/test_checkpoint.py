"""Run folder, crash-safe saves, the resume order, exports and partial loading."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import checkpoint
from pipeline.checkpoint import (
    CheckpointError,
    RunFolder,
    capture_rng,
    prune_checkpoints,
    remove_incomplete,
    restore_rng,
    resume,
    save_checkpoint,
)
from pipeline.dist import DistEnv
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.state import TrainState
from pipeline.engine.strategy import StrategyConfig, build_strategy
from pipeline.export import (
    ExportError,
    load_export,
    write_export,
)


class Net(nn.Module):
    def __init__(self, num_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def single(model):
    return build_strategy(StrategyConfig(kind="single", precision="fp32"), model,
                          OptimizerConfig(), 2, DistEnv(), total_steps=10)


def test_run_folder_layout(tmp_path):
    run = RunFolder(tmp_path / "pipe" / "stage").create()
    assert run.config_path.name == "config.yaml" and run.done_path.name == "DONE.json"
    assert run.step_dir(12) == run.checkpoints_dir / "step_12"
    assert run.export_dir.is_dir() and run.logs_dir.is_dir()
    assert run.latest_dir() is None and run.latest_step() is None


def test_save_writes_complete_folder_then_latest_and_keeps_last_k(tmp_path):
    run = RunFolder(tmp_path)
    strategy, state = single(Net()), TrainState()
    for step in (2, 4, 6, 8):
        state.step = step
        save_checkpoint(run, strategy, state, keep_last=2)
    assert run.latest_path.read_text().strip() == "step_8"
    assert [p.name for p in run.step_dirs()] == ["step_6", "step_8"]
    assert (run.step_dir(8) / checkpoint.COMPLETE_MARKER).is_file()
    assert not list(tmp_path.glob(".*.tmp"))


def test_saving_the_latest_step_again_is_a_no_op(tmp_path):
    run = RunFolder(tmp_path)
    strategy, state = single(Net()), TrainState(step=3)
    save_checkpoint(run, strategy, state)
    stamp = (run.step_dir(3) / "single_strategy.pt").stat().st_mtime_ns
    save_checkpoint(run, strategy, state)
    assert (run.step_dir(3) / "single_strategy.pt").stat().st_mtime_ns == stamp


def test_crash_before_latest_leaves_previous_checkpoint_usable(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    strategy, state = single(Net()), TrainState(step=2)
    save_checkpoint(run, strategy, state)

    def crash(*_):
        raise SystemExit("killed while saving")

    monkeypatch.setattr(checkpoint, "_publish_latest", crash)
    state.step = 4
    with pytest.raises(SystemExit):
        save_checkpoint(run, strategy, state)
    assert run.latest_step() == 2
    assert run.step_dir(4).is_dir()  # the half-written folder
    monkeypatch.undo()
    removed = remove_incomplete(run)
    assert removed == [run.step_dir(4)] and not run.step_dir(4).exists()
    fresh_state = TrainState()
    _, outcome = resume(run, Net(seed=5), single, fresh_state)
    assert outcome.kind == "resume" and fresh_state.step == 2


def test_latest_naming_an_incomplete_folder_is_no_checkpoint(tmp_path):
    run = RunFolder(tmp_path).create()
    run.step_dir(5).mkdir()
    run.latest_path.write_text("step_5\n")
    assert run.latest_dir() is None and run.latest_step() is None
    assert run.complete_step_dirs() == []


def test_prune_never_deletes_latest(tmp_path):
    run = RunFolder(tmp_path)
    strategy = single(Net())
    for step in (1, 2):
        save_checkpoint(run, strategy, TrainState(step=step), keep_last=5)
    assert prune_checkpoints(run, keep_last=1) == [run.step_dir(1)]
    assert run.latest_step() == 2


def test_rng_round_trip():
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_restores_model_optimizer_schedule_and_state(tmp_path):
    run = RunFolder(tmp_path)
    model = Net()
    strategy = single(model)
    x = torch.randn(6, 4)
    for _ in range(3):
        strategy.backward(model(x).pow(2).mean())
        strategy.step()
    state = TrainState(step=3, extra={"tracker_run_id": "abc"})
    save_checkpoint(run, strategy, state)
    restored_state = TrainState()
    restored, outcome = resume(run, Net(seed=9), single, restored_state)
    assert outcome.kind == "resume" and "resumed exactly" in str(outcome)
    assert restored_state.extra == {"tracker_run_id": "abc"} and restored_state.step == 3
    assert restored.lr == pytest.approx(strategy.lr)
    assert restored.optimizer.state_dict()["state"].keys() == strategy.optimizer.state_dict()["state"].keys()
    for a, b in zip(model.state_dict().values(), restored.module.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_resume_order_latest_beats_init_from_beats_scratch(tmp_path):
    export = tmp_path / "parent_export"
    write_export(export, Net(num_classes=3, seed=1).state_dict(), {"classes": ["a", "b", "c"]})
    run = RunFolder(tmp_path / "run")

    _, outcome = resume(run, Net(), single, TrainState())
    assert outcome.kind == "scratch" and str(outcome) == "started from scratch"

    child = Net(num_classes=5, seed=2)
    fresh_head = child.head.weight.detach().clone()
    strategy, outcome = resume(run, child, single, TrainState(), init_from=export)
    assert outcome.kind == "init_from" and outcome.path == export
    assert sorted(key for key, _, _ in outcome.report.mismatched) == ["head.bias", "head.weight"]
    torch.testing.assert_close(child.backbone[0].weight, Net(seed=1).backbone[0].weight)
    torch.testing.assert_close(child.head.weight, fresh_head)

    save_checkpoint(run, strategy, TrainState(step=1))
    _, outcome = resume(run, Net(num_classes=5), single, TrainState(), init_from=export)
    assert outcome.kind == "resume"


def test_export_round_trip_and_meta(tmp_path):
    model = Net()
    write_export(tmp_path, model.state_dict(), {"arch": {"num_classes": 3}, "metrics": {"ap": 0.5}})
    state_dict, meta = load_export(tmp_path / "model.safetensors")
    assert meta["arch"] == {"num_classes": 3} and meta["format"] == "detrforge-export-1"
    assert state_dict.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state_dict[key], value)
    assert json.loads((tmp_path / "meta.json").read_text())["weights_sha256"]


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(ExportError, match="not a complete export"):
        load_export(tmp_path)
    write_export(tmp_path, {"w": torch.zeros(2)}, {})
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ExportError, match="does not match the sha256"):
        load_export(tmp_path)
    with pytest.raises(ExportError, match="JSON-serialisable"):
        write_export(tmp_path / "x", {"w": torch.zeros(1)}, {"bad": object()})


def test_tied_weights_export(tmp_path):
    shared = torch.zeros(3)
    write_export(tmp_path, {"a": shared, "b": shared}, {})
    assert set(load_export(tmp_path)[0]) == {"a", "b"}


class Counter:
    """A named stateful object (as a callback is)."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_named_state_goes_back_by_name_whatever_the_order(tmp_path):
    run = RunFolder(tmp_path)
    save_checkpoint(run, single(Net()), TrainState(step=2),
                    stateful={"eval": Counter(7), "ema": Counter(3)})
    restored = {"ema": Counter(), "eval": Counter()}  # other order than at save time
    resume(run, Net(), single, TrainState(), stateful=restored)
    assert restored["eval"].value == 7 and restored["ema"].value == 3


def test_added_and_removed_stateful_objects_warn_and_keep_fresh_state(tmp_path, caplog):
    run = RunFolder(tmp_path)
    save_checkpoint(run, single(Net()), TrainState(step=2),
                    stateful={"eval": Counter(7), "old": Counter(5)})
    _, outcome = resume(run, Net(), single, TrainState())
    added, kept = Counter(11), Counter()
    with caplog.at_level("WARNING", logger="pipeline.checkpoint"):
        outcome.restore({"eval": kept, "new": added})  # restored later, once built
    assert kept.value == 7 and added.value == 11
    assert "no state for 'new'" in caplog.text and "state for 'old'" in caplog.text


def test_stateful_objects_as_a_list_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="mapping name -> object"):
        save_checkpoint(RunFolder(tmp_path), single(Net()), TrainState(step=1),
                        stateful=[Counter()])


def test_checkpoint_with_positional_callback_state_is_a_clear_error(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    strategy = single(Net())
    real_save = strategy.save

    def legacy_save(directory, client):  # what an older version wrote
        inner = dict(client[checkpoint.CLIENT_KEY])
        inner.pop(checkpoint.NAMED_KEY)
        inner["callbacks"] = [{"last": {}, "last_step": 3}]
        real_save(directory, {checkpoint.CLIENT_KEY: inner})

    monkeypatch.setattr(strategy, "save", legacy_save)
    save_checkpoint(run, strategy, TrainState(step=2))
    with pytest.raises(CheckpointError, match="by list position"):
        resume(run, Net(), single, TrainState())


def test_checkpoint_module_does_not_import_the_engine():
    import subprocess
    import sys

    code = ("import sys, pipeline.checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resume_with_another_world_size_is_one_clear_error_before_any_shard_loads(tmp_path):
    run = RunFolder(tmp_path)
    save_checkpoint(run, single(Net()), TrainState(step=2))
    assert json.loads((run.step_dir(2) / checkpoint.WORLD_FILE).read_text()) == {"world_size": 1}

    def shards_made_for_another_world(model):
        strategy = single(model)

        def load(directory):  # what DeepSpeed does with another world size: a confusing error
            raise RuntimeError("size mismatch for param_groups")

        strategy.load = load
        return strategy

    # As if 2 ranks had written it; this process is a world of 1.
    (run.step_dir(2) / checkpoint.WORLD_FILE).write_text(json.dumps({"world_size": 2}))
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        resume(run, Net(), shards_made_for_another_world, TrainState())
    message = str(err.value)
    assert "written by 2 ranks, this job has 1" in message and "\n" not in message
    assert "size mismatch" not in message
    assert run.latest_step() == 2  # nothing was skipped or deleted
