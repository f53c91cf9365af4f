"""Exponential moving average of a model's weights, checkpointed as callback state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.engine.callbacks import Callback


@dataclass
class EmaConfig:
    """Weight EMA; disabled unless enabled."""

    enabled: bool = False  # keep an EMA copy of the weights
    decay: float = 0.9998  # per optimizer step; the effective window is 1 / (1 - decay) steps
    warmup: bool = True  # use min(decay, (1 + n) / (10 + n)) early so the EMA follows quickly

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"engine/ema.py EmaConfig: decay must be in (0, 1), got {self.decay}")


class ModelEma:
    """fp32 EMA of the parameters and floating buffers of `module`, kept on CPU by default.

    ZeRO-3 holds only a shard of each parameter per rank, so an EMA there needs gathering every
    step; it is refused instead of being silently wrong (see `check_supported`).
    """

    def __init__(self, module: nn.Module, cfg: EmaConfig, device: str | torch.device = "cpu"):
        check_supported(module)
        self.cfg = cfg
        self.device = torch.device(device)
        self.updates = 0
        self.shadow = {name: t.detach().to(self.device, torch.float32, copy=True)
                       for name, t in _floating_tensors(module)}

    def decay_now(self) -> float:
        """The decay used by the next update."""
        if not self.cfg.warmup:
            return self.cfg.decay
        return min(self.cfg.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow = d * shadow + (1 - d) * weights, after an optimizer step."""
        decay = self.decay_now()
        for name, tensor in _floating_tensors(module):
            self.shadow[name].mul_(decay).add_(tensor.detach().to(self.device, torch.float32),
                                               alpha=1 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        """Plain dict of tensors and the update count."""
        return {"updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Restore; the key set must match the model's."""
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("engine/ema.py: EMA state does not match the model's parameter names")
        self.updates = int(state["updates"])
        self.shadow = {k: v.to(self.device, torch.float32) for k, v in state["shadow"].items()}

    def copy_to(self, module: nn.Module) -> None:
        """Write the EMA weights into `module` (e.g. an eval copy)."""
        with torch.no_grad():
            for name, tensor in _floating_tensors(module):
                tensor.copy_(self.shadow[name].to(tensor.device, tensor.dtype))


class EmaUpdate(Callback):
    """Updates `ema` from `module` after every optimizer step; its state rides in checkpoints."""

    name = "ema"

    def __init__(self, ema: ModelEma, module: nn.Module):
        self.ema, self.module = ema, module

    def on_step_end(self, state, metrics) -> None:
        self.ema.update(self.module)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


def check_supported(module: nn.Module) -> None:
    """Raise for ZeRO-3-partitioned parameters (they carry `ds_id`)."""
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise NotImplementedError(
            "engine/ema.py: weight EMA under ZeRO stage 3 is not supported "
            "(parameters are sharded); use zero_stage <= 2 or disable ema"
        )


def _floating_tensors(module: nn.Module):
    for name, param in module.named_parameters():
        yield name, param
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point():
            yield name, buffer
