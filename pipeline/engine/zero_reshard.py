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


def _my_slice(parts: list[torch.Tensor], partition: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's partition of the group the lean `parts` make up, zero-padded at the end."""
    whole = torch.cat([p.reshape(-1).float().cpu() for p in parts])
    size = partition.numel()
    piece = whole[rank * size:(rank + 1) * size]
    out = torch.zeros(size, dtype=partition.dtype)
    out[:piece.numel()] = piece
    return out.to(partition.device)


def _check_layout(optimizer: Any, saved: list[dict[str, Any]], keys: Any) -> None:
    stage = int(saved[0][keys.ZERO_STAGE])
    if stage not in (1, 2):
        raise ReshardError(f"engine/zero_reshard.py: the checkpoint was written by ZeRO stage "
                           f"{stage}; its optimizer state can be re-partitioned from stage 1 or 2")
    if getattr(optimizer, "round_robin_gradients", False) or any(
            any(padding) for padding in getattr(optimizer, "round_robin_bit16_padding", [])):
        raise ReshardError("engine/zero_reshard.py: round-robin gradients or parameter alignment "
                           "order the flat groups by world size; they cannot be re-partitioned")
    groups = optimizer.bit16_groups
    for index, group in enumerate(groups):
        saved_numel = sum(int(s[keys.SINGLE_PARTITION_OF_FP32_GROUPS][index].numel())
                          for s in saved)
        numel = sum(p.numel() for p in group)
        if saved_numel != numel:
            raise ReshardError(f"engine/zero_reshard.py: parameter group {index} has {numel} "
                               f"elements, the checkpoint's has {saved_numel}; the model changed")


def load_repartitioned_optimizer(optimizer: Any, directory: Path, rank: int) -> int:
    """Give the ZeRO-1/2 `optimizer` (DeepSpeed's, built for this world) its fp32 master
    weights and AdamW state from every saved rank's file in `directory`; returns the saved
    number of ranks. Every rank reads every file (they are the only copy of the state)."""
    from deepspeed.checkpoint import constants as keys

    files = saved_optimizer_files(directory)
    saved = [torch.load(f, map_location="cpu", weights_only=False)[keys.OPTIMIZER_STATE_DICT]
             for f in files]
    if len(optimizer.bit16_groups) != len(saved[0][keys.SINGLE_PARTITION_OF_FP32_GROUPS]):
        raise ReshardError("engine/zero_reshard.py: the checkpoint has another number of "
                           "parameter groups than this model's optimizer")
    _check_layout(optimizer, saved, keys)
    lean = [_lean_group_states(s, keys) for s in saved]
    base = optimizer.optimizer  # the torch optimizer, one flat fp32 partition per group
    for index, partition in enumerate(optimizer.single_partition_of_fp32_groups):
        fp32 = [s[keys.SINGLE_PARTITION_OF_FP32_GROUPS][index] for s in saved]
        partition.data.copy_(_my_slice(fp32, partition, rank))
        state = base.state[base.param_groups[index]["params"][0]]
        for key, value in lean[0][index].items():
            if torch.is_tensor(value) and value.dim():
                state[key] = _my_slice([s[index][key] for s in lean], partition, rank)
            else:
                state[key] = value.clone() if torch.is_tensor(value) else value
    optimizer._link_all_hp_params()  # as DeepSpeed's own load: fragments see the new state
    return len(saved)
