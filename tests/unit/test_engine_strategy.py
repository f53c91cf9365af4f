"""Strategy config validation, the derived DeepSpeed dict and the single-process strategy."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.dist import DistEnv
from pipeline.engine.optim import OptimizerConfig
from pipeline.engine.strategy import (
    CheckpointLoadError,
    SingleStrategy,
    StrategyConfig,
    build_strategy,
    deepspeed_config,
    resolve_precision,
)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "fsdp"}, "kind 'fsdp'"),
    ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3"),
    ({"precision": "fp16"}, "precision 'fp16'"),
    ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"zero_stage": 0, "offload_optimizer": True}, "offload_optimizer needs zero_stage >= 1"),
    ({"zero_stage": 2, "offload_params": True}, "offload_params needs zero_stage 3"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StrategyConfig(**kwargs)


def test_deepspeed_dict_is_derived_not_repeated():
    cfg = StrategyConfig(zero_stage=3, grad_clip=0.5, grad_accum_steps=4, offload_optimizer=True,
                         offload_params=True)
    config = deepspeed_config(cfg, micro_batch_size=2, world_size=8, precision="bf16")
    assert config["train_batch_size"] == 2 * 4 * 8
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert config["zero_force_ds_cpu_optimizer"] is False
    # The lr lives in the client optimizer and its schedule, never in the DeepSpeed dict.
    assert "optimizer" not in config and "scheduler" not in config
    assert "lr" not in repr(config)


def test_fp32_dict_has_no_bf16_settings():
    config = deepspeed_config(StrategyConfig(zero_stage=1), 4, 2, "fp32")
    assert config["bf16"] == {"enabled": False} and "data_types" not in config
    assert "offload_optimizer" not in config["zero_optimization"]


def test_precision_auto_is_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_single_strategy_refuses_several_processes():
    with pytest.raises(ValueError, match="kind=deepspeed"):
        build_strategy(StrategyConfig(kind="single"), nn.Linear(2, 2), OptimizerConfig(), 1,
                       DistEnv(rank=0, world_size=2), total_steps=1)


def test_single_strategy_clips_and_accumulates():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    cfg = StrategyConfig(kind="single", precision="fp32", grad_clip=1e-3, grad_accum_steps=2)
    strategy = build_strategy(cfg, model, OptimizerConfig(lr=1.0, weight_decay=0.0,
                              schedule="constant"), 1, DistEnv(), total_steps=5)
    assert isinstance(strategy, SingleStrategy)
    loss = (model(torch.full((1, 2), 100.0)) - 1).pow(2).sum()
    strategy.backward(loss)
    assert strategy.step() is False and torch.count_nonzero(model.weight) == 0
    strategy.backward((model(torch.full((1, 2), 100.0)) - 1).pow(2).sum())
    assert strategy.step() is True
    assert torch.count_nonzero(model.weight) == 2  # Adam moves by ~lr whatever the clip
    assert all(p.grad is None for p in model.parameters())


def test_single_strategy_bf16_autocast_and_consolidated_state(tmp_path):
    model = nn.Linear(2, 2)
    strategy = build_strategy(StrategyConfig(kind="single", precision="bf16"), model,
                              OptimizerConfig(), 1, DistEnv(), total_steps=1)
    with strategy.autocast():
        out = strategy.module(torch.randn(1, 2))
    assert out.dtype == torch.bfloat16 and strategy.compute_dtype == torch.bfloat16
    state = strategy.consolidated_state_dict()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    with pytest.raises(CheckpointLoadError, match="same strategy kind"):
        strategy.load(tmp_path)


def test_engine_and_single_strategy_never_import_deepspeed():
    code = (
        "import sys, torch\n"
        "from pipeline.dist import DistEnv\n"
        "from pipeline.engine.optim import OptimizerConfig\n"
        "from pipeline.engine.strategy import StrategyConfig, build_strategy\n"
        "import pipeline.engine.loop, pipeline.checkpoint, pipeline.export\n"
        "build_strategy(StrategyConfig(kind='single'), torch.nn.Linear(2, 2), OptimizerConfig(),"
        " 1, DistEnv(), total_steps=1)\n"
        "bad = [m for m in ('deepspeed', 'mlflow', 'pipeline.models', 'pipeline.data',"
        " 'pipeline.losses') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_buckets_are_capped_at_an_aligned_model_size():
    config = deepspeed_config(StrategyConfig(zero_stage=3), 1, 2, "fp32", num_params=1000)
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1024
    assert zero["stage3_prefetch_bucket_size"] == 1024
    big = deepspeed_config(StrategyConfig(zero_stage=2), 1, 2, "fp32", num_params=10**10)
    assert big["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert "stage3_prefetch_bucket_size" not in big["zero_optimization"]
