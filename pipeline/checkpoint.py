"""Crash-safe checkpoints of a run folder and the resume order.

A save writes `checkpoints/step_<N>/` on every rank (strategy shards + client state), waits for
all ranks, fsyncs, drops a COMPLETE marker, and only then replaces `latest` atomically. A kill at
any moment therefore leaves `latest` naming a complete folder; a half-written newer folder (no
COMPLETE marker) is removed on the next start. Complete folders are never deleted on recovery:
only keep-last pruning removes one, once a newer complete one is `latest`.

Resume takes the newest complete folder that loads (`latest` is a hint, not a requirement): a
`latest` naming a missing folder, or a complete folder whose files are truncated, is skipped
with a warning naming it, and the next older complete one is tried. Rank 0 picks the folder and
broadcasts it, so all ranks load the same one, and all ranks agree on whether it loaded.

A resume with another world size is refused with one line unless `train.elastic_resume` asks
for it (pipeline/checkpoint_elastic.py re-derives what depends on the world size).

The client state holds what the strategy does not: the progress (TrainState), the RNG states of
every rank, the data position of every rank and the state of named stateful objects (the
engine's callbacks), keyed by name as torchtitan's checkpointer keys its state: a callback added
or removed since the save is reported, never given another one's state. The tracker run id
rides in the progress' `extra`.

This module knows the engine only through the small protocols below (no import of
`pipeline.engine`): anything with `state_dict()`/`load_state_dict()` can be checkpointed.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline import dist
from pipeline.atomic import fsync_dir, write_bytes_atomic, write_json_atomic
from pipeline.checkpoint_elastic import (
    WORLD_FILE,
    check_world_size,
    load_resharded,
    restore_loader,
    rng_state_for,
    saved_world_size,
)
from pipeline.checkpoint_select import (
    CheckpointMismatchError,
    choose_and_load,
    has_checkpoint,
    report_fallback,
)
from pipeline.export import LoadReport, load_export, load_partial
from pipeline.run_folder import COMPLETE_MARKER, CheckpointError, RunFolder, is_complete, step_of

__all__ = ["COMPLETE_MARKER", "CheckpointError", "CheckpointMismatchError", "Checkpointer",
           "ResumeOutcome", "RunFolder", "Stateful", "WORLD_FILE", "capture_rng", "load_checkpoint", "load_named_state", "prune_checkpoints",
           "remove_incomplete", "restore_rng", "resume", "save_checkpoint"]

log = logging.getLogger(__name__)
CLIENT_KEY = "detrforge"  # DeepSpeed merges client state into its own dict: one key of ours
NAMED_KEY = "stateful"  # client state: {name: state_dict()} of the named stateful objects
_LEGACY_LIST_KEY = "callbacks"  # older checkpoints: callback states by list position


class Stateful(Protocol):
    """Anything whose state a checkpoint keeps (callbacks, loaders, the progress)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Progress(Stateful, Protocol):
    """The loop's progress (engine.state.TrainState): the step names the checkpoint folder."""

    step: int


class ShardedState(Protocol):
    """What a strategy offers the checkpoint: model, optimizer and schedule (sharded or not)."""

    def save(self, directory: Path, client_state: dict[str, Any]) -> None: ...

    def load(self, directory: Path) -> dict[str, Any]: ...


# --- RNG -------------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """This process's RNG states as plain types (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- save ------------------------------------------------------------------------------------

def _mark_complete(directory: Path) -> None:
    write_bytes_atomic(directory / COMPLETE_MARKER, f"{step_of(directory)}\n".encode())


def _publish_latest(run: RunFolder, directory: Path) -> None:
    """Mark `directory` complete, then point `latest` at it (atomic, last)."""
    _mark_complete(directory)
    write_bytes_atomic(run.latest_path, f"{directory.name}\n".encode())


def _fsync_tree(directory: Path) -> None:
    for folder, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


def prune_checkpoints(run: RunFolder, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints up to `latest` (never
    `latest`, nothing without a complete `latest`, nothing newer than it, no diverged save)."""
    latest = run.latest_dir()
    if latest is None or keep_last < 1:
        return []
    older = [p for p in run.complete_step_dirs() if step_of(p) <= step_of(latest)]
    doomed = [p for p in older[:-keep_last] if p != latest]
    for directory in doomed:
        shutil.rmtree(directory, ignore_errors=True)
    return doomed


def remove_incomplete(run: RunFolder) -> list[Path]:
    """Rank 0 deletes the step folders a killed save left behind: those without the COMPLETE
    marker, and only those. Every rank must call it (it ends with a barrier)."""
    removed = []
    if dist.is_main():
        for directory in run.step_dirs():
            if not is_complete(directory):
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
    dist.barrier()
    return removed


def _loader_state(loader: Any) -> Any:
    return loader.state_dict() if hasattr(loader, "state_dict") else None


def _named_states(stateful: Mapping[str, Stateful]) -> dict[str, Any]:
    if not isinstance(stateful, Mapping):
        raise CheckpointError(
            "checkpoint.py: stateful objects must be a mapping name -> object (e.g. "
            f"engine.callbacks.stateful_callbacks(callbacks)), got {type(stateful).__name__}; "
            "state kept by list position would be restored into the wrong object"
        )
    return {str(name): obj.state_dict() for name, obj in stateful.items()}


def save_checkpoint(run: RunFolder, strategy: ShardedState, state: Progress, *,
                    loader: Any = None, stateful: Mapping[str, Stateful] | None = None,
                    keep_last: int = 3, diverged: bool = False) -> Path:
    """Checkpoint step `state.step`; every rank must call it. Returns the step folder.

    `stateful` maps a stable name to each object whose state is kept (rank 0's is saved: the
    objects must hold the same state on every rank). A step that `latest` already names is not
    written twice (the periodic save and the stop save may meet on one step).
    `diverged=True` (the non-finite guard) writes `checkpoints/diverged_step_<N>/` instead:
    complete, kept for inspection, but never `latest` and never a reason to prune good ones.
    """
    directory = run.diverged_dir(state.step) if diverged else run.step_dir(state.step)
    if not diverged and run.latest_step() == state.step:
        return directory
    client = {
        "train_state": state.state_dict(),
        "rng": dist.all_gather_object(capture_rng()),
        "loader": dist.all_gather_object(_loader_state(loader)),
        NAMED_KEY: _named_states(stateful or {}),
        "world_size": dist.get_world_size(),
    }
    if dist.is_main():
        run.create()
        shutil.rmtree(directory, ignore_errors=True)  # leftovers of a killed save of this step
    dist.barrier()
    strategy.save(directory, {CLIENT_KEY: client})
    if dist.is_main():
        write_json_atomic(directory / WORLD_FILE, {"world_size": dist.get_world_size()})
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        _fsync_tree(directory)
        if diverged:
            _mark_complete(directory)
        else:
            _publish_latest(run, directory)
            prune_checkpoints(run, keep_last)
    dist.barrier()
    return directory


class Checkpointer:
    """Saves one run's state into its run folder: `save(state)` is what callbacks are handed.

    It is built right after the strategy; the named stateful objects (callbacks, which need
    `save` themselves) join with `track` once they exist, before the first save.
    """

    def __init__(self, run: RunFolder, strategy: ShardedState, *, loader: Any = None,
                 keep_last: int = 3):
        self.run, self.strategy, self.loader, self.keep_last = run, strategy, loader, keep_last
        self.stateful: dict[str, Stateful] = {}

    def track(self, stateful: Mapping[str, Stateful]) -> None:
        """Keep the state of these named objects in every later checkpoint."""
        taken = sorted(set(stateful) & set(self.stateful))
        if taken:
            raise CheckpointError(f"checkpoint.py: stateful names {taken} are already tracked")
        self.stateful.update(stateful)

    def save(self, state: Progress) -> Path:
        """`save_checkpoint` of this run (every rank calls it)."""
        return save_checkpoint(self.run, self.strategy, state, loader=self.loader,
                               stateful=self.stateful, keep_last=self.keep_last)

    def save_diverged(self, state: Progress) -> Path:
        """The non-finite guard's save: `checkpoints/diverged_step_<N>/`, never `latest`."""
        return save_checkpoint(self.run, self.strategy, state, loader=self.loader,
                               stateful=self.stateful, diverged=True)


# --- resume ----------------------------------------------------------------------------------

def load_named_state(stateful: Mapping[str, Stateful], saved: Mapping[str, Any],
                     where: str | Path = "checkpoint") -> None:
    """Give every named object the state saved under its name.

    An object without saved state (added since the save) keeps its fresh state, and saved
    state without an object (removed since) is ignored: both with a warning, never by
    handing one object another's state.
    """
    for name, obj in stateful.items():
        if name in saved:
            obj.load_state_dict(saved[name])
        else:
            log.warning("checkpoint: %s holds no state for %r (added since it was saved); it "
                        "starts fresh", where, name)
    for name in sorted(set(saved) - set(stateful)):
        log.warning("checkpoint: %s holds state for %r, which is not configured now; ignored",
                    where, name)


def _saved_named_state(client: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    if NAMED_KEY in client:
        return dict(client[NAMED_KEY])
    legacy = client.get(_LEGACY_LIST_KEY) or []
    if any(legacy):  # positions cannot be matched to names safely
        raise CheckpointMismatchError(
            f"checkpoint.py: {directory} keeps callback state by list position (an older "
            "detrforge); finish the run with that version, or rerun with --force to archive "
            "the run folder and start over"
        )
    return {}


def _load_client(directory: Path, strategy: ShardedState, state: Progress, loader: Any,
                 elastic: bool) -> tuple[dict[str, Any], int]:
    """Strategy, progress, RNG and data position from `directory`; returns the named state
    and the number of ranks that wrote it."""
    saved_world = saved_world_size(directory)
    resharded = check_world_size(directory, saved_world, elastic)
    loaded = load_resharded(strategy, directory, saved_world) if resharded else strategy.load(
        directory)
    client = loaded.get(CLIENT_KEY)
    if client is None:
        raise CheckpointError(f"checkpoint.py: {directory} holds no detrforge client state")
    if saved_world is None:  # a checkpoint older than WORLD_FILE
        check_world_size(directory, client["world_size"], elastic, recorded=False)
    rank = dist.get_rank()
    state.load_state_dict(client["train_state"])
    restore_rng(rng_state_for(client["rng"], rank))
    restore_loader(loader, client["loader"], rank, resharded)
    return _saved_named_state(client, directory), int(client["world_size"])


def _load_newest(run: RunFolder, strategy: ShardedState, state: Progress, loader: Any,
                 elastic: bool = False) -> tuple[Path, dict[str, Any], int]:
    """The newest complete checkpoint that loads, on every rank; warns about what it skipped.
    Returns (folder, named state, the world size that wrote it)."""
    attempt = choose_and_load(run, lambda directory: _load_client(directory, strategy, state,
                                                                   loader, elastic))
    report_fallback(run, attempt)
    return attempt.loaded, *attempt.saved_state


def load_checkpoint(run: RunFolder, strategy: ShardedState, state: Progress, *,
                    loader: Any = None, stateful: Mapping[str, Stateful] | None = None,
                    elastic: bool = False) -> Path:
    """Restore everything from the newest complete checkpoint that loads (every rank calls it).
    `elastic`: also one written by another number of ranks. Returns the folder loaded."""
    directory, saved, _ = _load_newest(run, strategy, state, loader, elastic)
    load_named_state(stateful or {}, saved, directory)
    return directory


@dataclass
class ResumeOutcome:
    """Which branch of the resume order was taken."""

    kind: str  # "resume" (own latest) | "init_from" (weights of an export) | "scratch"
    path: Path | None = None  # the checkpoint or export used
    report: LoadReport | None = None  # init_from: what was loaded
    saved_state: dict[str, Any] = field(default_factory=dict, repr=False)  # resume: named state
    saved_world_size: int | None = None  # resume: the number of ranks that wrote the checkpoint

    @property
    def world_changed(self) -> bool:
        """Whether this was an elastic resume (another number of ranks wrote the checkpoint)."""
        return self.saved_world_size not in (None, dist.get_world_size())

    def __str__(self) -> str:
        if self.kind == "resume" and self.world_changed:
            return (f"resumed from {self.path}, written by {self.saved_world_size} ranks, with "
                    f"{dist.get_world_size()} (elastic: data position and schedule re-derived)")
        if self.kind == "resume":
            return f"resumed exactly from {self.path}"
        if self.kind == "init_from":
            return f"initialised model weights from {self.path}: {self.report}"
        return "started from scratch"

    def restore(self, stateful: Mapping[str, Stateful]) -> None:
        """Hand the checkpoint's named state to objects built after `resume` (the callbacks,
        which need the strategy and the tracker first). Nothing to do unless kind is "resume"."""
        if self.kind == "resume":
            load_named_state(stateful, self.saved_state, self.path)


def resume(run: RunFolder, model: nn.Module, make_strategy: Callable[[nn.Module], Any],
           state: Progress, *, loader: Any = None, stateful: Mapping[str, Stateful] | None = None,
           init_from: str | Path | None = None, prefix_map: Mapping[str, str] | None = None,
           elastic: bool = False) -> tuple[Any, ResumeOutcome]:
    """The resume order, in one place:

    1. the run folder has a complete checkpoint -> exact resume from the newest that loads (model, optimizer, schedule, step, RNG,
       data position, tracker run id; named state now if `stateful` is given, else later
       through `outcome.restore(...)`);
    2. else `init_from` (a path to an export; the stage layer resolves stage names and
       models:/ URIs) -> model weights only, partially, before the strategy wraps the model
       (ZeRO copies weights into its own buffers at wrap time);
    3. else scratch.

    `make_strategy(model)` builds the strategy (every rank calls `resume`). `elastic`
    (train.elastic_resume): a checkpoint written by another number of ranks is resumed too,
    re-derived (pipeline/checkpoint_elastic.py); without it that is a one-line error.
    Returns (strategy, outcome).
    """
    if has_checkpoint(run):
        strategy = make_strategy(model)
        remove_incomplete(run)
        directory, saved, world = _load_newest(run, strategy, state, loader, elastic)
        outcome = ResumeOutcome("resume", directory, saved_state=saved, saved_world_size=world)
        if stateful is not None:
            outcome.restore(stateful)
        return strategy, outcome
    outcome = ResumeOutcome("scratch")
    if init_from is not None:
        state_dict, _ = load_export(init_from)
        outcome = ResumeOutcome("init_from", Path(init_from),
                                load_partial(model, state_dict, prefix_map))
    strategy = make_strategy(model)
    remove_incomplete(run)
    return strategy, outcome
