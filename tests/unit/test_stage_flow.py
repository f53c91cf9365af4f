"""train_stage end to end on a tiny regression task (single process, tracking off): the
derived values in config.yaml, and callback state restored by name on resume."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
import yaml
from torch import nn

from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.strategy import StrategyConfig
from pipeline.run_folder import RunFolder
from pipeline.tracking import TrackingConfig
from stages.common import StageContext, StageParts, TrainConfig, train_stage

MICRO_BATCH = 4


class Stream:
    """Endless (x, y) batches; resumable by position."""

    def __init__(self):
        self.position = 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.position)
            x = torch.randn(MICRO_BATCH, 3, generator=gen)
            self.position += 1
            yield x, x.sum(dim=1, keepdim=True)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@dataclass
class TinyConfig:
    width: int = 5


def build_parts(env) -> StageParts:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))

    def task_step(strategy, state, batch):
        x, y = batch
        return nn.functional.mse_loss(strategy.module(x), y), {}

    def evaluate(strategy):
        with torch.no_grad():
            x = torch.ones(2, 3)
            return {"out": float(strategy.module(x).mean())}

    return StageParts(model=model, loader=Stream(), task_step=task_step, evaluate=evaluate,
                      micro_batch_size=MICRO_BATCH, main_metric="out", meta={"arch": "tiny"},
                      group_of=lambda name: "backbone" if name.startswith("0.") else "default")


def run_tiny(tmp_path, max_steps: int, eval_every: int = 0):
    ctx = StageContext(tmp_path, "pipe", "tiny", stop_file=tmp_path / "stop_request")
    train = TrainConfig(max_steps=max_steps, log_every=1, eval_every=eval_every,
                        checkpoint_every=2, progress_bar=False)
    optim = OptimizerConfig(lr=1e-2, weight_decay=0.05, backbone_lr_mult=0.1)
    strategy = StrategyConfig(kind="single", precision="fp32", grad_accum_steps=2)
    return train_stage(ctx, TinyConfig(), train, optim, strategy, TrackingConfig(enabled=False),
                       build_parts)


def test_config_yaml_holds_global_batch_size_param_groups_and_strategy_dict(tmp_path):
    result = run_tiny(tmp_path, max_steps=2)
    assert result.status == "done"
    derived = yaml.safe_load(RunFolder(tmp_path / "pipe" / "tiny").config_path.read_text())[
        "derived"]
    assert derived["world_size"] == 1 and derived["grad_accum_steps"] == 2
    assert derived["global_batch_size"] == MICRO_BATCH * 1 * 2
    assert derived["deepspeed"] is None  # the single strategy has no DeepSpeed dict
    groups = {group["name"]: group for group in derived["param_groups"]}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "default_decay",
                           "default_no_decay"}
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-3)  # lr x backbone_lr_mult
    assert groups["default_decay"]["lr"] == pytest.approx(1e-2)
    assert groups["default_no_decay"]["weight_decay"] == 0.0
    assert groups["backbone_decay"]["weight_decay"] == pytest.approx(0.05)
    assert groups["backbone_decay"]["num_params"] == 15 and groups["default_decay"]["num_params"] == 5
    assert sum(group["num_params"] for group in groups.values()) == 3 * 5 + 5 + 5 + 1


def test_an_added_stateful_callback_warns_and_resume_goes_on(tmp_path, caplog):
    run_tiny(tmp_path, max_steps=2)  # its last checkpoint (step 2) is resumed below
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        second = run_tiny(tmp_path, max_steps=4, eval_every=2)  # PeriodicEval is new
    assert second.status == "done" and second.start == "resume"
    assert "no state for 'periodic_eval'" in caplog.text
    assert RunFolder(tmp_path / "pipe" / "tiny").latest_step() == 4
