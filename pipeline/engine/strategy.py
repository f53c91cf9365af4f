"""How a model is trained across processes: DeepSpeed ZeRO 0-3, or one plain process.

Both strategies offer the same interface, so the loop and the checkpoint code never ask which
one they hold. This is the only module that imports deepspeed (with engine/zero_reshard.py,
which it calls), and only when a DeepSpeed strategy is built (importing it is slow and pulls in
mlflow).

The DeepSpeed config dict is *derived* (`deepspeed_config`): batch sizes and clipping come from
StrategyConfig and the stage's micro-batch size, the lr lives in the client optimizer and its
schedule, so nothing is written twice. A torch-native AdamW is passed as the client optimizer
(`zero_force_ds_cpu_optimizer: false`) so that no DeepSpeed op needs compiling.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import dist
from pipeline.checkpoint_select import CheckpointMismatchError
from pipeline.engine.ds_config import StrategyConfig, deepspeed_config
from pipeline.engine.optim import OptimizerConfig, build_optimizer, build_scheduler
from pipeline.engine.zero_reshard import ReshardError, load_repartitioned_optimizer

SINGLE_STATE_FILE = "single_strategy.pt"


class CheckpointLoadError(RuntimeError):
    """A checkpoint folder could not be loaded by the strategy."""


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
    # Global gradient norm of the last optimizer step (before clipping). Not finite: the step
    # was dropped (no parameter, optimizer-state or schedule change), the same on every rank.
    last_grad_norm: float = 0.0

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
        """End a micro-batch; at an accumulation boundary set `last_grad_norm`, clip, step
        optimizer and schedule (neither when the norm is not finite), zero the gradients and
        return True."""
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
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        self.last_grad_norm = float(norm)
        if math.isfinite(self.last_grad_norm):
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


def _grad_norm(module: nn.Module) -> float:
    """L2 norm of every gradient of `module` (0 without any)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in module.parameters()
             if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def continue_schedule_at_built_lr(scheduler: torch.optim.lr_scheduler.LambdaLR,
                                  param_groups: list[dict[str, Any]]) -> None:
    """After an elastic resume the loaded schedule keeps its step, but its peak lrs are the
    ones built for this run (`optim.scale_lr_with_batch` scales them for the new global
    batch), not the checkpoint's; the lr of the next step follows from both."""
    scheduler.base_lrs = [group["lr"] for group in param_groups]
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


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
        if boundary and self.cfg.zero_stage == 0:
            # No ZeRO optimizer to skip a non-finite step: the gradients are all-reduced by
            # now (equal on every rank), so check them here and drop the step ourselves.
            self.last_grad_norm = _grad_norm(self.module)
            if not math.isfinite(self.last_grad_norm):
                self._drop_step_zero0()
                return boundary
        self.engine.step()
        if boundary and self.cfg.zero_stage > 0:  # ZeRO skips a non-finite step itself
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = float("nan") if norm is None else float(norm)
        return boundary

    def _drop_step_zero0(self) -> None:
        """engine.step() without gradients (torch skips those parameters), schedule kept."""
        schedule, lrs = self.scheduler.state_dict(), [g["lr"] for g in self.optimizer.param_groups]
        for param in self.module.parameters():
            param.grad = None
        self.engine.step()
        self.scheduler.load_state_dict(schedule)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

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
        return self._load_engine(directory, optimizer=True)

    def load_resharded(self, directory: Path) -> dict[str, Any]:
        """`load` of a checkpoint written by another number of ranks (train.elastic_resume):
        the ZeRO-1/2 optimizer state is re-partitioned for this world (engine/zero_reshard.py),
        and the schedule continues at its saved step from the peak lr built for this run."""
        if self.cfg.zero_stage == 3:
            raise CheckpointMismatchError(
                f"engine/strategy.py: {directory} holds ZeRO-3 shards of another world size; "
                "train.elastic_resume re-partitions DeepSpeed ZeRO stage 0, 1 and 2 checkpoints "
                "only (DeepSpeed re-partitions ZeRO-3 through an offline universal checkpoint); "
                "resume with the number of ranks that wrote it"
            )
        client_state = self._load_engine(directory, optimizer=self.cfg.zero_stage == 0)
        if self.cfg.zero_stage > 0:  # ZeRO-0: rank 0 saved the whole optimizer state
            try:
                load_repartitioned_optimizer(self.engine.optimizer, directory, dist.get_rank())
            except ReshardError as err:
                raise CheckpointMismatchError(f"{err}; resume with the number of ranks that "
                                              "wrote it") from err
        continue_schedule_at_built_lr(self.scheduler, self.param_groups)
        return client_state

    def _load_engine(self, directory: Path, optimizer: bool) -> dict[str, Any]:
        # The folder is the one rank 0 chose and broadcast (pipeline.checkpoint_select), so
        # every rank loads the same step; a failure here makes all ranks try an older one.
        try:
            path, client_state = self.engine.load_checkpoint(
                str(directory.parent), tag=directory.name,
                load_optimizer_states=optimizer, load_lr_scheduler_states=True,
            )
        except (OSError, RuntimeError, EOFError, KeyError, ValueError) as err:
            raise CheckpointLoadError(
                f"engine/strategy.py: DeepSpeed cannot load {directory} "
                f"({type(err).__name__}: {' '.join(str(err).split())[:160]})"
            ) from err
        if path is None:
            raise CheckpointLoadError(f"engine/strategy.py: DeepSpeed found no checkpoint in "
                                      f"{directory}")
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
