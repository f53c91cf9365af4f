"""ZeRO-1/2 optimizer state of a checkpoint written by another number of data-parallel ranks.

DeepSpeed 0.19 does not do this for us: `engine.load_checkpoint` refuses optimizer state saved
with another data-parallel size (only an offline-converted "universal" checkpoint may change
it), and its legacy elastic format (`zero_optimization.elastic_checkpoint`) cannot be used with
torch's AdamW at all: its loader asserts a `step` in the parameter groups, which torch keeps in
the per-parameter state, so even a resume with the same world size fails. Checkpoints therefore
stay in DeepSpeed's default format (one optimizer file per rank), and this module re-partitions
them at load time, the way DeepSpeed's elastic loader would:

each parameter group of ZeRO-1/2 is one flat fp32 vector cut into equal partitions, one per
rank, the last one padded with zeros. The saved partitions without their padding, put end to
end, are the whole group (fp32 master weights and each of AdamW's per-element states); the new
rank takes its slice of that, padded like DeepSpeed pads it. Per-group scalars (AdamW's `step`)
are the same on every rank and are taken from saved rank 0. The fp32 master weights come from
the saved fp32 partitions (exact, also under bf16, where the model's bf16 copy would round).
Every rank reads every saved file, one at a time, keeping only its slice: an elastic resume
reads the whole optimizer state once per rank (no offline conversion step instead).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["ReshardError", "load_repartitioned_optimizer", "saved_optimizer_files"]

# zero_pp_rank_<dp rank>_mp_rank_00_optim_states.pt, with a "bf16_" prefix under bf16
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class ReshardError(ValueError):
    """The saved ZeRO state cannot be re-partitioned for this run (the message says why)."""


def saved_optimizer_files(directory: Path) -> list[Path]:
    """The per-rank ZeRO optimizer files of a checkpoint folder, by saved data-parallel rank."""
    found = {}
    for path in Path(directory).iterdir():
        match = _OPTIM_FILE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    if sorted(found) != list(range(len(found))) or not found:
        raise ReshardError(f"engine/zero_reshard.py: {directory} holds no complete set of ZeRO "
                           f"optimizer files (ranks found: {sorted(found)})")
    return [found[rank] for rank in range(len(found))]


def _lean_group_states(saved: dict[str, Any], keys: Any) -> list[dict[str, Any]]:
    """One rank's optimizer state per group, its partition padding cut off."""
    base = saved[keys.BASE_OPTIMIZER_STATE]
    if isinstance(base, list):  # DeepSpeed's elastic format: already without padding
        return base
    states = []
    for index, padding in enumerate(saved[keys.GROUP_PADDINGS]):
        state = base["state"].get(index, {})
        states.append({k: v[:v.numel() - padding] if torch.is_tensor(v) and v.dim() else v
                       for k, v in state.items()})
    return states


class _GroupSlice:
    """This rank's partition of one flat group, filled from the saved ranks' pieces in order."""

    def __init__(self, partition: torch.Tensor, rank: int):
        self.partition, self.size = partition, partition.numel()
        self.start, self.seen = rank * self.size, 0  # where this rank's slice begins; read so far
        self.fp32 = torch.zeros(self.size, dtype=partition.dtype)
        self.states: dict[str, torch.Tensor] = {}  # AdamW's per-element states
        self.scalars: dict[str, Any] = {}  # per-group values, equal on every saved rank

    def add(self, fp32: torch.Tensor, state: dict[str, Any]) -> None:
        """The next saved rank's lean piece of the group: copy where it meets this slice."""
        count = fp32.numel()
        lo, hi = max(self.seen, self.start), min(self.seen + count, self.start + self.size)
        for key, value in [("", fp32), *state.items()]:
            if not (torch.is_tensor(value) and value.dim()):
                self.scalars.setdefault(key, value.clone() if torch.is_tensor(value) else value)
                continue
            target = self.fp32 if key == "" else self.states.setdefault(
                key, torch.zeros(self.size, dtype=self.partition.dtype))
            if lo < hi:
                target[lo - self.start:hi - self.start] = value.reshape(-1)[
                    lo - self.seen:hi - self.seen]
        self.seen += count


def _check_layout(optimizer: Any, saved: dict[str, Any], keys: Any) -> None:
    if not hasattr(optimizer, "single_partition_of_fp32_groups"):
        raise ReshardError(f"engine/zero_reshard.py: {type(optimizer).__name__} is not "
                           "DeepSpeed's ZeRO-1/2 optimizer; its state cannot be re-partitioned")
    stage = int(saved[keys.ZERO_STAGE])
    if stage not in (1, 2):
        raise ReshardError(f"engine/zero_reshard.py: the checkpoint was written by ZeRO stage "
                           f"{stage}; its optimizer state can be re-partitioned from stage 1 or 2")
    if getattr(optimizer, "round_robin_gradients", False) or any(
            any(padding) for padding in getattr(optimizer, "round_robin_bit16_padding", [])):
        raise ReshardError("engine/zero_reshard.py: round-robin gradients or parameter alignment "
                           "order the flat groups by world size; they cannot be re-partitioned")
    if len(optimizer.bit16_groups) != len(saved[keys.SINGLE_PARTITION_OF_FP32_GROUPS]):
        raise ReshardError("engine/zero_reshard.py: the checkpoint has another number of "
                           "parameter groups than this model's optimizer")


def load_repartitioned_optimizer(optimizer: Any, directory: Path, rank: int) -> int:
    """Give the ZeRO-1/2 `optimizer` (DeepSpeed's, built for this world) its fp32 master
    weights and AdamW state from every saved rank's file in `directory`; returns the saved
    number of ranks. Every rank reads every file, one at a time (they are the only copy of
    the state), and keeps only its own slice."""
    from deepspeed.checkpoint import constants as keys

    files = saved_optimizer_files(directory)
    slices = [_GroupSlice(p, rank) for p in optimizer.single_partition_of_fp32_groups]
    for path in files:
        saved = torch.load(path, map_location="cpu", weights_only=False)[keys.OPTIMIZER_STATE_DICT]
        _check_layout(optimizer, saved, keys)
        for piece, fp32, state in zip(slices, saved[keys.SINGLE_PARTITION_OF_FP32_GROUPS],
                                      _lean_group_states(saved, keys)):
            piece.add(fp32, state)
        del saved
    base = optimizer.optimizer  # the torch optimizer, one flat fp32 partition per group
    for index, (piece, group) in enumerate(zip(slices, optimizer.bit16_groups)):
        numel = sum(p.numel() for p in group)
        if piece.seen != numel:
            raise ReshardError(f"engine/zero_reshard.py: parameter group {index} has {numel} "
                               f"elements, the checkpoint's has {piece.seen}; the model changed")
        piece.partition.data.copy_(piece.fp32.to(piece.partition.device))
        state = base.state[base.param_groups[index]["params"][0]]
        state.update({k: v for k, v in piece.scalars.items() if k})
        state.update({k: v.to(piece.partition.device) for k, v in piece.states.items()})
    optimizer._link_all_hp_params()  # as DeepSpeed's own load: fragments see the new state
    return len(files)
