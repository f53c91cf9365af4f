"""How a model is trained across processes: DeepSpeed ZeRO 0-3, or one plain process.

Both strategies offer the same interface, so the loop and the checkpoint code never ask which
one they hold. This is the only module that imports deepspeed, and only when a DeepSpeed
strategy is built (importing it is slow and pulls in mlflow).

The DeepSpeed config dict is *derived* (`deepspeed_config`): batch sizes and clipping come from
StrategyConfig and the stage's micro-batch size, the lr lives in the client optimizer and its
schedule, so nothing is written twice. A torch-native AdamW is passed as the client optimizer
(`zero_force_ds_cpu_optimizer: false`) so that no DeepSpeed op needs compiling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import dist
from pipeline.engine.optim import OptimizerConfig, build_optimizer, build_scheduler

KINDS = ("deepspeed", "single")
PRECISIONS = ("auto", "fp32", "bf16")
SINGLE_STATE_FILE = "single_strategy.pt"


class CheckpointLoadError(RuntimeError):
    """A checkpoint folder could not be loaded by the strategy."""


@dataclass
class StrategyConfig:
    """How to distribute and run the optimisation."""

    kind: str = "deepspeed"  # "deepspeed" (ZeRO, any world size) | "single" (one process, debug)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3 (0 = plain data parallel); ignored by "single"
    precision: str = "auto"  # "auto" (bf16 on a bf16-capable GPU, else fp32) | "fp32" | "bf16"
    grad_clip: float = 0.1  # max global gradient norm; 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    offload_optimizer: bool = False  # ZeRO >= 1: keep optimizer state in CPU memory
    offload_params: bool = False  # ZeRO 3: keep parameters in CPU memory

    def __post_init__(self) -> None:
        where = "engine/strategy.py StrategyConfig"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"{where}: zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{where}: precision {self.precision!r} is not one of {PRECISIONS}")
        if self.grad_clip < 0:
            raise ValueError(f"{where}: grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"{where}: grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.offload_optimizer and self.zero_stage < 1:
            raise ValueError(f"{where}: offload_optimizer needs zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"{where}: offload_params needs zero_stage 3")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on a CUDA device that supports it, else "fp32"."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def default_device(env: dist.DistEnv) -> torch.device:
    """This rank's GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


DEFAULT_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's reduce/allgather bucket default
DEFAULT_PREFETCH_ELEMENTS = 50_000_000  # DeepSpeed's ZeRO-3 prefetch bucket default


def deepspeed_config(
    cfg: StrategyConfig, micro_batch_size: int, world_size: int, precision: str,
    num_params: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict, derived from the stage's settings (write it to the run folder).

    `precision` is resolved ("fp32" or "bf16"). The lr is absent on purpose: the client
    optimizer and scheduler carry it. With `num_params`, communication buckets are capped at
    the model size: DeepSpeed's defaults (5e8 elements, 2 GB in fp32) preallocate far more
    than a small model needs under ZeRO-3.
    """
    if micro_batch_size < 1:
        raise ValueError(f"engine/strategy.py: micro_batch_size must be >= 1, got {micro_batch_size}")
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if num_params is not None:
        # Rounded up to 1024 elements: DeepSpeed wants buckets aligned to its padding factor.
        model_elements = -(-max(1, num_params) // 1024) * 1024
        zero["reduce_bucket_size"] = min(DEFAULT_BUCKET_ELEMENTS, model_elements)
        zero["allgather_bucket_size"] = min(DEFAULT_BUCKET_ELEMENTS, model_elements)
        if cfg.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = min(DEFAULT_PREFETCH_ELEMENTS, model_elements)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # torch's AdamW as client optimizer: nothing to JIT-compile, also when offloading.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # BatchNorm's running stats must match the bf16 parameters or its kernel refuses them.
        config["data_types"] = {"buffer_dtype": "bf16"}
    return config


def describe_param_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """name, base lr, weight decay and parameter count of each group (for config.yaml).

    Read from the client optimizer before DeepSpeed wraps it: ZeRO-3 partitions the parameters
    (their numel becomes that of one shard) and the schedule's warmup scales `lr`.
    """
    return [{"name": group.get("name", f"group_{index}"),
             "lr": float(group.get("initial_lr", group["lr"])),
             "weight_decay": float(group["weight_decay"]),
             "num_params": int(sum(p.numel() for p in group["params"]))}
            for index, group in enumerate(optimizer.param_groups)]


class Strategy:
    """The interface the loop and the checkpoint code rely on."""

    module: nn.Module  # the model to call for forward
    device: torch.device  # where inputs go
    precision: str  # "fp32" | "bf16" (resolved)
    grad_accum_steps: int  # micro-batches per optimizer step
    param_groups: list[dict[str, Any]]  # describe_param_groups of the optimizer, as built
    deepspeed_config: dict[str, Any] | None = None  # the derived DeepSpeed dict, if any

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of floating inputs to the model."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass: bf16 autocast when training in bf16."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self) -> None:
        """Switch the model to training mode."""
        self.module.train()

    def eval(self) -> None:
        """Switch the model to evaluation mode."""
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (scaled by 1/grad_accum_steps)."""
        raise NotImplementedError

    def step(self) -> bool:
        """End a micro-batch; at an accumulation boundary clip, step optimizer and schedule,
        zero the gradients and return True."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        """Current lr of the highest-lr parameter group (the non-backbone one)."""
        raise NotImplementedError

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Write model, optimizer and schedule (sharded under ZeRO) plus `client_state` into
        `directory`. Every rank must call it."""
        raise NotImplementedError

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore from `directory` and return the client state. Every rank must call it."""
        raise NotImplementedError

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 model state on CPU on every rank (gathered from shards); every rank calls."""
        raise NotImplementedError


class SingleStrategy(Strategy):
    """One process, plain PyTorch: the debugging path, and the reference in tests."""

    def __init__(self, cfg: StrategyConfig, model: nn.Module, optimizer_cfg: OptimizerConfig,
                 total_steps: int, device: torch.device,
                 group_of: Callable[[str], str] | None = None):
        self.cfg = cfg
        self.device = device
        self.precision = resolve_precision(cfg.precision, device)
        self.grad_accum_steps = cfg.grad_accum_steps
        self.module = model.to(device)
        self.optimizer = build_optimizer(self.module, optimizer_cfg, group_of)
        self.scheduler = build_scheduler(self.optimizer, optimizer_cfg, total_steps)
        self.param_groups = describe_param_groups(self.optimizer)
        self.micro_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()

    def step(self) -> bool:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum_steps:
            return False
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @property
    def lr(self) -> float:
        return max(self.scheduler.get_last_lr())

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({
            "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps,
            "client_state": client_state,
        }, directory / SINGLE_STATE_FILE)

    def load(self, directory: Path) -> dict[str, Any]:
        path = directory / SINGLE_STATE_FILE
        if not path.is_file():
            raise CheckpointLoadError(
                f"engine/strategy.py: {path} is missing; was this checkpoint written by the "
                "deepspeed strategy? Resume with the same strategy kind"
            )
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = int(state["micro_steps"])
        return state["client_state"]

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: _to_cpu_fp32(v) for k, v in self.module.state_dict().items()}


def _to_cpu_fp32(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.to("cpu", copy=True).contiguous()


def _persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, sub in module.named_modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def _import_deepspeed():
    """Import deepspeed with the settings that keep it from compiling ops on CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".cache/torch_extensions"))
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as error:
        raise ImportError(
            "engine/strategy.py: the deepspeed strategy needs `pip install deepspeed`; "
            "or set strategy.kind=single for one process"
        ) from error
    # The shared-memory allreduce op is JIT-compiled (~35 s) and gloo does the same job.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO stage 0-3 over an initialised torch.distributed group."""

    def __init__(self, cfg: StrategyConfig, model: nn.Module, optimizer_cfg: OptimizerConfig,
                 micro_batch_size: int, env: dist.DistEnv, total_steps: int,
                 group_of: Callable[[str], str] | None = None):
        deepspeed = _import_deepspeed()
        self.cfg = cfg
        self.device = default_device(env)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.grad_accum_steps = cfg.grad_accum_steps
        dist.init_distributed(env)
        num_params = sum(p.numel() for p in model.parameters())
        self.deepspeed_config = deepspeed_config(cfg, micro_batch_size, env.world_size,
                                                 self.precision, num_params)
        model = model.to(self.device)
        optimizer = build_optimizer(model, optimizer_cfg, group_of)
        scheduler = build_scheduler(optimizer, optimizer_cfg, total_steps)
        self.param_groups = describe_param_groups(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=self.deepspeed_config, dist_init_required=False,
        )
        self.module = self.engine.module
        self._deepspeed = deepspeed

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    @property
    def lr(self) -> float:
        return max(group["lr"] for group in self.engine.optimizer.param_groups)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name,
                                    client_state=client_state, save_latest=False)

    def load(self, directory: Path) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(
            str(directory.parent), tag=directory.name,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if path is None:
            raise CheckpointLoadError(
                f"engine/strategy.py: DeepSpeed found no checkpoint in {directory}; "
                "delete the run folder's `latest` to start over"
            )
        return client_state or {}

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        # Every rank walks the parameters in the same order: each gather is a collective.
        for name, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            state[name] = _to_cpu_fp32(param if full is None else full)
        for name, buffer in _persistent_buffers(self.module):
            state[name] = _to_cpu_fp32(buffer)
        return state


def build_strategy(
    cfg: StrategyConfig,
    model: nn.Module,
    optimizer_cfg: OptimizerConfig,
    micro_batch_size: int,
    dist_env: dist.DistEnv,
    *,
    total_steps: int,
    group_of: Callable[[str], str] | None = None,
) -> Strategy:
    """The strategy for `cfg`. `total_steps` (optimizer steps) shapes the lr schedule;
    `group_of(param_name)` names each parameter's lr group (see `optim.build_param_groups`)."""
    if cfg.kind == "single":
        if dist_env.is_distributed:
            raise ValueError(
                "engine/strategy.py: strategy.kind=single runs one process but the environment "
                f"has world_size {dist_env.world_size}; use kind=deepspeed"
            )
        return SingleStrategy(cfg, model, optimizer_cfg, total_steps, default_device(dist_env),
                              group_of)
    return DeepSpeedStrategy(cfg, model, optimizer_cfg, micro_batch_size, dist_env,
                             total_steps, group_of)
