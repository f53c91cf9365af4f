"""AdamW with parameter groups: an lr multiplier per group the model names (pretrained backbone,
deformable attention's linear projections), no decay on norms, biases and embeddings.

The model decides which group each parameter belongs to (``group_of(name)``, e.g. a detector's
``param_group``); this module only turns group names into learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from pipeline.engine.schedule import SCHEDULES, make_lr_lambda

LR_SCALINGS = ("none", "linear", "sqrt")
NO_DECAY_MODULES = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.Embedding, nn.EmbeddingBag,
)
# Learned position / query / token embeddings kept as bare nn.Parameter (ViT, DETR).
NO_DECAY_NAME_PARTS = ("pos_embed", "position_embed", "query_embed", "level_embed", "cls_token",
                       "reg_token", "mask_token", "relative_position_bias_table")


@dataclass
class OptimizerConfig:
    """AdamW and its lr schedule."""

    lr: float = 1e-4  # base learning rate (of the non-backbone groups)
    weight_decay: float = 1e-4  # decoupled weight decay on weight matrices / conv kernels
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's (beta1, beta2)
    eps: float = 1e-8  # Adam's denominator epsilon
    backbone_lr_mult: float = 0.1  # lr multiplier of the "backbone" group (pretrained body)
    linear_proj_lr_mult: float = 0.1  # lr multiplier of the "linear_proj" group (Deformable DETR's
    # sampling offsets and reference points: lr_linear_proj_mult)
    schedule: str = "cosine"  # "cosine" | "step" | "constant", after linear warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup
    milestones: list[int] = field(default_factory=list)  # "step" schedule: steps where lr *= gamma
    gamma: float = 0.1  # "step" schedule: factor at each milestone
    min_lr_ratio: float = 0.0  # "cosine" schedule: final lr as a fraction of the base lr
    # How lr follows the global batch size (micro batch x ranks x accumulation): "none" keeps lr
    # (DETR's recipes), "linear" multiplies it by global/base_batch_size, "sqrt" by the root.
    scale_lr_with_batch: str = "none"
    base_batch_size: int = 0  # the global batch size `lr` was tuned for (needed when scaling)

    def __post_init__(self) -> None:
        where = "engine/optim.py OptimizerConfig"
        if self.lr <= 0:
            raise ValueError(f"{where}: lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"{where}: weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("backbone_lr_mult", "linear_proj_lr_mult"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{where}: schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"{where}: warmup_steps must be >= 0, got {self.warmup_steps}")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"{where}: milestones must be increasing, got {self.milestones}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{where}: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.scale_lr_with_batch not in LR_SCALINGS:
            raise ValueError(f"{where}: scale_lr_with_batch {self.scale_lr_with_batch!r} is not "
                             f"one of {LR_SCALINGS}")
        if self.scale_lr_with_batch != "none" and self.base_batch_size < 1:
            raise ValueError(f"{where}: scale_lr_with_batch={self.scale_lr_with_batch} needs "
                             "optim.base_batch_size (the global batch size lr was tuned for)")

    def scaled_lr(self, global_batch_size: int) -> float:
        """``lr`` for a run whose global batch is ``global_batch_size`` (see scale_lr_with_batch)."""
        if self.scale_lr_with_batch == "none":
            return self.lr
        ratio = global_batch_size / self.base_batch_size
        return self.lr * (ratio if self.scale_lr_with_batch == "linear" else math.sqrt(ratio))

    def for_global_batch(self, global_batch_size: int) -> OptimizerConfig:
        """This config with ``lr`` scaled for ``global_batch_size`` (what the optimizer uses)."""
        return replace(self, lr=self.scaled_lr(global_batch_size), scale_lr_with_batch="none")

    def lr_mults(self) -> dict[str, float]:
        """lr multiplier of each parameter group name a model may return."""
        return {"default": 1.0, "linear_proj": self.linear_proj_lr_mult,
                "backbone": self.backbone_lr_mult}

    def schedule_kwargs(self) -> dict:
        """The arguments of `schedule.lr_factor` taken from this config."""
        fields = asdict(self)
        keys = ("schedule", "warmup_steps", "milestones", "gamma", "min_lr_ratio")
        return {key: fields[key] for key in keys}


def _decays(module_by_param: dict[str, nn.Module], name: str, param: nn.Parameter) -> bool:
    if param.ndim <= 1:  # biases, norm scales, scalar gates
        return False
    if isinstance(module_by_param[name], NO_DECAY_MODULES):
        return False
    return not any(part in name for part in NO_DECAY_NAME_PARTS)


def _owner_modules(model: nn.Module) -> dict[str, nn.Module]:
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = module
    return owners


def build_param_groups(
    model: nn.Module, cfg: OptimizerConfig, group_of: Callable[[str], str] | None = None
) -> list[dict]:
    """One group per (group name, decay or not); frozen parameters are left out.

    ``group_of(param_name)`` is "default", "linear_proj" or "backbone" (None: all "default"); a
    group's lr is ``cfg.lr`` times its multiplier. Each group carries "name" (e.g.
    "backbone_decay") and "param_names" for logging and tests; torch ignores extra keys.
    """
    mults = cfg.lr_mults()
    order = list(mults)
    owners = _owner_modules(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group_name = group_of(name) if group_of is not None else "default"
        if group_name not in mults:
            raise ValueError(f"engine/optim.py: parameter {name!r} is in group {group_name!r}; "
                             f"the model's param_group must return one of {order}")
        decay = _decays(owners, name, param)
        group = groups.setdefault((order.index(group_name), decay), {
            "name": f"{group_name}_{'decay' if decay else 'no_decay'}",
            "params": [], "param_names": [],
            "lr": cfg.lr * mults[group_name],
            "weight_decay": cfg.weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("engine/optim.py: the model has no trainable parameters")
    return [groups[key] for key in sorted(groups)]


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, group_of: Callable[[str], str] | None = None
) -> torch.optim.AdamW:
    """torch-native AdamW (no compiled ops, so it runs under DeepSpeed on CPU too)."""
    groups = build_param_groups(model, cfg, group_of)
    # fused: one elementwise kernel per parameter (CPU and CUDA), so an element's update does not
    # depend on how ZeRO regroups or flattens parameters, and it is 2-3x faster than the
    # per-tensor loop (11.7 M parameters on a 2-core CPU: 6.9 vs 17.7 ms per step); HF's Trainer
    # defaults to it too. The per-tensor loop is kept for dtypes or devices it does not support.
    fused = all(_fused_supported(p) for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False, fused=fused)


def _fused_supported(param: torch.Tensor) -> bool:
    """torch's fused AdamW takes floating-point tensors on CPU and CUDA."""
    return param.is_floating_point() and param.device.type in ("cpu", "cuda")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `schedule.lr_factor`, stepped once per optimizer step."""
    if total_steps < 1:
        raise ValueError(f"engine/optim.py: total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, make_lr_lambda(total_steps, **cfg.schedule_kwargs())
    )
