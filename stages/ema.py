"""Weight EMA in a stage: the `train.ema` section, evaluation and export with the EMA weights.

The engine owns the average itself (pipeline/engine/ema.py: ``ModelEma`` and the ``EmaUpdate``
callback that checkpoints it); this module is how a stage uses it. With ``train.ema.enabled`` every
evaluation (periodic and final) and the export use the EMA weights; the training weights are put
back after each evaluation, so the optimizer never sees the average.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.engine.ema import EmaConfig, EmaUpdate, ModelEma


@dataclass
class StageEmaConfig(EmaConfig):
    """`train.ema`: EmaConfig's switches, plus a paired check of what the average changes."""

    # Also evaluate the training weights at each evaluation, logged as eval_raw/<metric>: the
    # same run without EMA, at the price of a second evaluation.
    eval_raw: bool = False


def build_ema(cfg: EmaConfig, module: nn.Module) -> EmaUpdate | None:
    """The callback keeping an EMA of `module`'s weights, or None when disabled."""
    if not cfg.enabled:
        return None
    device = next(module.parameters()).device
    return EmaUpdate(ModelEma(module, cfg, device=device), module)


@contextmanager
def ema_weights(ema: EmaUpdate | None, module: nn.Module) -> Iterator[None]:
    """Inside: `module` holds the EMA weights; after: its own again (no-op without EMA)."""
    if ema is None:
        yield
        return
    saved = {name: t.detach().clone() for name, t in module.state_dict().items()
             if name in ema.ema.shadow}
    ema.ema.copy_to(module)
    try:
        yield
    finally:
        with torch.no_grad():
            own = module.state_dict()
            for name, tensor in saved.items():
                own[name].copy_(tensor)


def ema_state_dict(ema: EmaUpdate | None, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A consolidated fp32 state dict with the EMA's tensors in place of the trained ones."""
    if ema is None:
        return state
    return {name: (ema.ema.shadow[name].detach().to("cpu", torch.float32).clone()
                   if name in ema.ema.shadow else tensor) for name, tensor in state.items()}


def with_ema(cfg: StageEmaConfig, module: nn.Module, parts: Any, tracker: Any,
             state: Any) -> tuple[EmaUpdate | None, Any]:
    """The EMA callback (None when disabled) and the stage's parts evaluating and exporting with
    its weights; with `eval_raw`, each evaluation first scores the training weights too, logged
    as eval_raw/<metric> at the current step (`state.step`)."""
    ema = build_ema(cfg, module)
    if ema is None:
        return None, parts
    evaluate, export_state = parts.evaluate, parts.export_state

    def evaluate_ema(strategy: Any) -> dict[str, float]:
        if getattr(cfg, "eval_raw", False):
            raw = evaluate(strategy)
            tracker.log_metrics({f"eval_raw/{k}": v for k, v in raw.items()}, state.step)
        with ema_weights(ema, strategy.module):
            return evaluate(strategy)

    def export_ema(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = ema_state_dict(ema, weights)
        return export_state(weights) if export_state is not None else weights

    return ema, dataclasses.replace(parts, evaluate=evaluate_ema, export_state=export_ema)
