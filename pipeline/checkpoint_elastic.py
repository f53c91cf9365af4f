"""A resume with another world size: refused with one line, unless `train.elastic_resume`.

Each checkpoint records the number of ranks that wrote it (WORLD_FILE), readable before any
shard is opened: without the switch a resume with another world size fails with that reason,
not with the error DeepSpeed or the data loader gives when it meets shards or a data position
made for another world size. With the switch, what depends on the world size is re-derived:

- model and optimizer: the strategy's `load_resharded` (ZeRO-1/2 optimizer state re-partitioned,
  engine/zero_reshard.py); a strategy without it is named in one line;
- RNG: new rank r takes the state of saved rank r % saved world size (see `rng_state_for`);
- data position: the loader's `load_resharded_state_dict(every saved rank's state)`
  (pipeline/data/stream.py keeps the epoch and the fraction of it consumed);
- schedule: the step is kept, the global batch and (optim.scale_lr_with_batch) the peak lr
  are the new world's; the stage records the change (`record_world_change`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.atomic import write_json_atomic
from pipeline.checkpoint_select import CheckpointMismatchError
from pipeline.run_folder import RunFolder

__all__ = ["WORLD_FILE", "WorldChange", "check_world_size", "load_resharded",
           "record_world_change", "restore_loader", "rng_state_for", "saved_world_size"]

log = logging.getLogger("pipeline.checkpoint")
WORLD_FILE = "world.json"  # in each checkpoint folder: {"world_size": N}
SWITCH = "train.elastic_resume=true"


def saved_world_size(directory: Path) -> int | None:
    """The world size `directory` records in WORLD_FILE (None for older checkpoints)."""
    try:
        return int(json.loads((directory / WORLD_FILE).read_text())["world_size"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def check_world_size(directory: Path, saved: int | None, elastic: bool,
                     recorded: bool = True) -> bool:
    """Whether `directory` was written by another number of ranks than this job has (then
    `elastic` must be on, else one line names the switch). `recorded=False`: the number comes
    from a checkpoint older than WORLD_FILE, which cannot be resumed elastically."""
    world = dist.get_world_size()
    if saved is None or saved == world:
        return False
    if elastic and recorded:
        return True
    way_out = (f"rerun with {SWITCH} to re-derive the data position and the schedule, or with"
               if recorded else "it predates elastic resume: rerun with")
    raise CheckpointMismatchError(
        f"checkpoint.py: {directory} was written by {saved} ranks, this job has {world}: a "
        "resume with another world size changes the global batch and each rank's data; "
        f"{way_out} the same number of processes (SLURM: nodes x tasks per node), or with "
        "--force to start over"
    )


def load_resharded(strategy: Any, directory: Path, saved: int) -> dict[str, Any]:
    """The strategy's state from a checkpoint of `saved` ranks; returns the client state."""
    load = getattr(strategy, "load_resharded", None)
    if load is None:
        raise CheckpointMismatchError(
            f"checkpoint.py: {directory} was written by {saved} ranks and "
            f"{type(strategy).__name__} cannot re-partition it; {SWITCH} supports "
            "strategy.kind=deepspeed with ZeRO stage 0, 1 or 2; resume with the number of "
            "ranks that wrote it"
        )
    return load(directory)


def rng_state_for(states: Sequence[Any], rank: int) -> Any:
    """Saved rank (rank % saved ranks)'s RNG state: this rank's own when the world size is
    unchanged. After an elastic resume to more ranks, rank r and r - saved ranks start from
    the same RNG state (their data differ; augmentation draws from per-sample seeds)."""
    return states[rank % len(states)]


def restore_loader(loader: Any, states: Sequence[Any], rank: int, resharded: bool) -> None:
    """Give `loader` its data position: its own rank's state, or (resharded) one re-derived
    from every saved rank's state by the loader itself."""
    if loader is None or all(state is None for state in states):
        return
    if not resharded:
        if states[rank] is not None:
            loader.load_state_dict(states[rank])
        return
    load = getattr(loader, "load_resharded_state_dict", None)
    if load is None:
        raise CheckpointMismatchError(
            f"checkpoint.py: the data loader {type(loader).__name__} keeps one position per "
            f"rank and cannot re-derive it for {dist.get_world_size()} ranks; resume with "
            f"{len(states)} ranks"
        )
    load(list(states))


@dataclass
class WorldChange:
    """One elastic resume, as `world_changes.json` in the run folder lists it."""

    step: int  # the checkpoint's step: the schedule continues there
    checkpoint: str  # its folder name
    old_world_size: int
    new_world_size: int
    old_global_batch: int
    new_global_batch: int
    old_peak_lr: float  # optim.lr scaled for each global batch (optim.scale_lr_with_batch)
    new_peak_lr: float
    lr: float  # the lr of the next step


def record_world_change(run: RunFolder, change: WorldChange) -> Path:
    """Rank 0 appends `change` to the run folder's world-change list and logs one warning."""
    path = run.world_changes_path
    if dist.is_main():
        events = json.loads(path.read_text()) if path.is_file() else []
        events.append({**asdict(change), "time": time.time()})
        write_json_atomic(path, events)
        log.warning("checkpoint: elastic resume of %s at step %d: %d -> %d ranks, global batch "
                    "%d -> %d, peak lr %.3g -> %.3g (recorded in %s)", change.checkpoint,
                    change.step, change.old_world_size, change.new_world_size,
                    change.old_global_batch, change.new_global_batch, change.old_peak_lr,
                    change.new_peak_lr, path.name)
    return path
