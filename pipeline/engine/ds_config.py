"""The strategy's config and the DeepSpeed config dict derived from it (never written by hand).

Batch sizes and clipping come from StrategyConfig and the stage's micro-batch size; the lr lives
in the client optimizer and its schedule, so nothing is written twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEFAULT_BUCKET_ELEMENTS", "DEFAULT_PREFETCH_ELEMENTS", "KINDS", "PRECISIONS",
           "StrategyConfig", "deepspeed_config"]

KINDS = ("deepspeed", "single")
PRECISIONS = ("auto", "fp32", "bf16")


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
    # No `elastic_checkpoint`, also for train.elastic_resume: DeepSpeed 0.19's elastic format
    # fails to load with torch's AdamW (its loader asserts a `step` in the parameter groups;
    # torch keeps it per parameter), even with the same world size. An elastic resume reads the
    # default per-rank files and re-partitions them itself (engine/zero_reshard.py).
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
        # check_grad_overflow: a non-finite global gradient norm skips the optimizer step
        # (ZeRO 1-3 do so in fp32 already), so the loop can drop it like a non-finite loss.
        "bf16": ({"enabled": True, "check_grad_overflow": True} if precision == "bf16"
                 else {"enabled": False}),
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
