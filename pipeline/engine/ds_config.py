"""The DeepSpeed config dict, derived from a stage's settings (never written by hand).

Batch sizes and clipping come from StrategyConfig and the stage's micro-batch size; the lr lives
in the client optimizer and its schedule, so nothing is written twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # strategy.py imports this module
    from pipeline.engine.strategy import StrategyConfig

__all__ = ["DEFAULT_BUCKET_ELEMENTS", "DEFAULT_PREFETCH_ELEMENTS", "deepspeed_config"]

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
