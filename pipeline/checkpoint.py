"""The run folder, crash-safe checkpoints and the resume order.

Run folder (one per stage run)::

    config.yaml  checkpoints/step_<N>/  latest  export/  DONE.json  logs/

A save writes `checkpoints/step_<N>/` on every rank (strategy shards + client state), waits for
all ranks, fsyncs, drops a COMPLETE marker, and only then replaces `latest` atomically. A kill at
any moment therefore leaves `latest` naming a complete folder; a half-written newer folder is
removed on the next start.

The client state holds what the strategy does not: TrainState, the RNG states of every rank, the
data position of every rank and the callbacks' state (the tracker run id rides in
TrainState.extra).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import dist
from pipeline.engine.callbacks import Callback, callbacks_state, load_callbacks_state
from pipeline.engine.state import TrainState
from pipeline.export import LoadReport, fsync_dir, load_export, load_partial, write_atomic_bytes

COMPLETE_MARKER = "COMPLETE"
CLIENT_KEY = "detrforge"  # DeepSpeed merges client state into its own dict: one key of ours
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed."""


class RunFolder:
    """Paths of one stage run (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config_path = self.root / "config.yaml"
        self.checkpoints_dir = self.root / "checkpoints"
        self.latest_path = self.root / "latest"
        self.export_dir = self.root / "export"
        self.done_path = self.root / "DONE.json"
        self.logs_dir = self.root / "logs"

    def create(self) -> RunFolder:
        """Make the folders (idempotent)."""
        for folder in (self.checkpoints_dir, self.export_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def step_dir(self, step: int) -> Path:
        """checkpoints/step_<step>/"""
        return self.checkpoints_dir / f"step_{step}"

    def latest_dir(self) -> Path | None:
        """The folder `latest` names, or None when there is no usable checkpoint."""
        if not self.latest_path.is_file():
            return None
        name = self.latest_path.read_text().strip()
        directory = self.checkpoints_dir / name
        if not _STEP_DIR.match(name) or not (directory / COMPLETE_MARKER).is_file():
            raise CheckpointError(
                f"checkpoint.py: {self.latest_path} names {name!r}, which is not a complete "
                "checkpoint folder; the run folder was edited by hand. Delete `latest` to "
                "start from scratch"
            )
        return directory

    def latest_step(self) -> int | None:
        """Step of the latest checkpoint, or None."""
        directory = self.latest_dir()
        return None if directory is None else _step_of(directory)

    def step_dirs(self) -> list[Path]:
        """checkpoints/step_*/ folders, oldest first (complete or not)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=_step_of)


def _step_of(directory: Path) -> int:
    return int(_STEP_DIR.match(directory.name).group(1))


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

def _publish_latest(run: RunFolder, directory: Path) -> None:
    """Mark `directory` complete, then point `latest` at it (atomic, last)."""
    (directory / COMPLETE_MARKER).write_text(f"{_step_of(directory)}\n")
    fsync_dir(directory)
    write_atomic_bytes(run.latest_path, f"{directory.name}\n".encode())


def _fsync_tree(directory: Path) -> None:
    for folder, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


def prune_checkpoints(run: RunFolder, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never `latest`)."""
    latest = run.latest_dir()
    complete = [p for p in run.step_dirs() if (p / COMPLETE_MARKER).is_file()]
    doomed = [p for p in complete[:-keep_last] if p != latest] if keep_last > 0 else []
    for directory in doomed:
        shutil.rmtree(directory, ignore_errors=True)
    return doomed


def remove_incomplete(run: RunFolder) -> list[Path]:
    """Rank 0 deletes step folders a killed save left behind: those without the COMPLETE
    marker and those newer than `latest`. Every rank must call it (it ends with a barrier)."""
    removed = []
    if dist.is_main():
        latest_step = run.latest_step()
        for directory in run.step_dirs():
            newer = latest_step is None or _step_of(directory) > latest_step
            if newer or not (directory / COMPLETE_MARKER).is_file():
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
    dist.barrier()
    return removed


def _loader_state(loader: Any) -> Any:
    return loader.state_dict() if hasattr(loader, "state_dict") else None


def save_checkpoint(run: RunFolder, strategy, state: TrainState, *, loader: Any = None,
                    callbacks: Iterable[Callback] = (), keep_last: int = 3) -> Path:
    """Checkpoint step `state.step`; every rank must call it. Returns the step folder.

    A step that `latest` already names is not written twice (the periodic save and the stop
    save may meet on one step).
    """
    directory = run.step_dir(state.step)
    if run.latest_step() == state.step:
        return directory
    client = {
        "train_state": state.state_dict(),
        "rng": dist.all_gather_object(capture_rng()),
        "loader": dist.all_gather_object(_loader_state(loader)),
        "callbacks": callbacks_state(callbacks),
        "world_size": dist.get_world_size(),
    }
    if dist.is_main():
        run.create()
        shutil.rmtree(directory, ignore_errors=True)  # leftovers of a killed save of this step
    dist.barrier()
    strategy.save(directory, {CLIENT_KEY: client})
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        _fsync_tree(directory)
        _publish_latest(run, directory)
        prune_checkpoints(run, keep_last)
    dist.barrier()
    return directory


# --- resume ----------------------------------------------------------------------------------

def load_checkpoint(run: RunFolder, strategy, state: TrainState, *, loader: Any = None,
                    callbacks: Iterable[Callback] = ()) -> Path:
    """Restore everything from `latest` (every rank calls it). Returns the folder loaded."""
    directory = run.latest_dir()
    if directory is None:
        raise CheckpointError(f"checkpoint.py: no `latest` checkpoint in {run.root}")
    client = strategy.load(directory).get(CLIENT_KEY)
    if client is None:
        raise CheckpointError(f"checkpoint.py: {directory} holds no detrforge client state")
    if client["world_size"] != dist.get_world_size():
        raise CheckpointError(
            f"checkpoint.py: {directory} was written by {client['world_size']} ranks, this job "
            f"has {dist.get_world_size()}; resume with the same number of processes"
        )
    rank = dist.get_rank()
    state.load_state_dict(client["train_state"])
    restore_rng(client["rng"][rank])
    if loader is not None and client["loader"][rank] is not None:
        loader.load_state_dict(client["loader"][rank])
    load_callbacks_state(callbacks, client["callbacks"])
    return directory


@dataclass
class ResumeOutcome:
    """Which branch of the resume order was taken."""

    kind: str  # "resume" (own latest) | "init_from" (weights of an export) | "scratch"
    path: Path | None = None  # the checkpoint or export used
    report: LoadReport | None = None  # init_from: what was loaded

    def __str__(self) -> str:
        if self.kind == "resume":
            return f"resumed exactly from {self.path}"
        if self.kind == "init_from":
            return f"initialised model weights from {self.path}: {self.report}"
        return "started from scratch"


def resume(run: RunFolder, model: nn.Module, make_strategy: Callable[[nn.Module], Any],
           state: TrainState, *, loader: Any = None, callbacks: Iterable[Callback] = (),
           init_from: str | Path | None = None,
           prefix_map: Mapping[str, str] | None = None) -> tuple[Any, ResumeOutcome]:
    """The resume order, in one place:

    1. the run folder has `latest` -> exact resume (model, optimizer, schedule, step, RNG,
       data position, callbacks, tracker run id);
    2. else `init_from` (a path to an export; the stage layer resolves stage names and
       models:/ URIs) -> model weights only, partially, before the strategy wraps the model
       (ZeRO copies weights into its own buffers at wrap time);
    3. else scratch.

    `make_strategy(model)` builds the strategy (every rank calls `resume`).
    Returns (strategy, outcome).
    """
    latest = run.latest_dir()
    if latest is not None:
        strategy = make_strategy(model)
        remove_incomplete(run)
        return strategy, ResumeOutcome("resume", load_checkpoint(
            run, strategy, state, loader=loader, callbacks=callbacks))
    outcome = ResumeOutcome("scratch")
    if init_from is not None:
        state_dict, _ = load_export(init_from)
        outcome = ResumeOutcome("init_from", Path(init_from), load_partial(model, state_dict, prefix_map))
    strategy = make_strategy(model)
    remove_incomplete(run)
    return strategy, outcome
