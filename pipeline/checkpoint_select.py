"""Which checkpoint a resume loads: the newest complete one whose files are intact and that
loads on every rank.

`latest` is a hint: a kill between a folder's COMPLETE marker and the rename of `latest`, a
folder deleted by hand, or a shard truncated by a full disk must not cost the user the
checkpoints that are still good, and must not make them delete files by hand. Rank 0 picks a
folder (newest complete first, after a cheap integrity check of its torch files) and broadcasts
its name; every rank loads that folder and all ranks agree on whether it loaded; on a failure
the next older complete folder is tried. Nothing is deleted here: a complete folder that does
not load is moved aside to `checkpoints/unloadable_step_<N>/` once another one has loaded.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.atomic import write_bytes_atomic
from pipeline.run_folder import CheckpointError, RunFolder

__all__ = ["CheckpointMismatchError", "LoadAttempt", "choose_and_load", "has_checkpoint",
           "report_fallback", "verify_files"]

log = logging.getLogger("pipeline.checkpoint")
REASON_CHARS = 200  # a skipped folder's reason stays on one short line


class CheckpointMismatchError(CheckpointError):
    """A checkpoint loads but does not fit this run (another world size, an older format): an
    older checkpoint would not fit either, so resume stops here instead of falling back."""


@dataclass
class LoadAttempt:
    """What `choose_and_load` loaded, and what it skipped on the way."""

    loaded: Path  # the step folder every rank loaded
    saved_state: Any  # what the load function returned (e.g. the named state)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder name, why)
    latest_name: str | None = None  # what `latest` said before the resume


def _one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


def verify_files(directory: Path) -> str | None:
    """Why `directory`'s torch files cannot be loaded, or None when they look intact.

    torch.save writes a zip archive whose directory sits at its end: a truncated file fails
    to open. This reads the archive directories only, not the tensors (cheap on big shards).
    """
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"{path.name} is truncated or corrupt ({_one_line(err)})"
    return None


def has_checkpoint(run: RunFolder) -> bool:
    """Whether the run folder holds a complete checkpoint (rank 0 looks, all ranks agree)."""
    found = None
    if dist.is_main():
        found = bool(run.complete_step_dirs())
        name = run.latest_name()
        if not found and name is not None:
            log.warning("checkpoint: %s names %r, which is not a complete checkpoint, and no "
                        "other complete checkpoint exists in %s; starting without one",
                        run.latest_path, name, run.checkpoints_dir)
    return bool(dist.broadcast_object(found))


def _pick(run: RunFolder, tried: set[str], skipped: list[tuple[str, str]]) -> str | None:
    """Rank 0: the newest complete folder not tried yet whose files look intact."""
    for directory in reversed(run.complete_step_dirs()):
        if directory.name in tried:
            continue
        tried.add(directory.name)
        why = verify_files(directory)
        if why is None:
            return directory.name
        skipped.append((directory.name, why))
    return None


def choose_and_load(run: RunFolder, load: Callable[[Path], Any]) -> LoadAttempt:
    """Load the newest complete checkpoint that loads on every rank; every rank calls it.

    `load(folder)` restores the state and returns what `saved_state` keeps; any exception but
    CheckpointMismatchError counts as "this folder does not load". Raises CheckpointError
    (one line, naming the folder and each skipped checkpoint) when none loads.
    """
    tried: set[str] = set()
    skipped: list[tuple[str, str]] = []
    latest_name = run.latest_name() if dist.is_main() else None
    while True:
        choice = _pick(run, tried, skipped) if dist.is_main() else None
        choice, skipped = dist.broadcast_object((choice, skipped))
        if choice is None:
            reasons = "; ".join(f"{name}: {why}" for name, why in skipped) or "none found"
            raise CheckpointError(
                f"checkpoint_select.py: no complete checkpoint in {run.checkpoints_dir} loads "
                f"({reasons}); nothing was deleted. Rerun with --force to archive this run "
                "folder and start over"
            )
        directory = run.checkpoints_dir / choice
        error = None
        try:
            saved = load(directory)
        except CheckpointMismatchError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure to load: try an older one
            error = _one_line(err)
        errors = [e for e in dist.all_gather_object(error) if e]
        if not errors:
            return LoadAttempt(directory, saved, skipped, latest_name)
        skipped.append((choice, errors[0]))
        if dist.is_main():
            tried.add(choice)


def _move_aside(run: RunFolder, name: str) -> Path | None:
    source = run.checkpoints_dir / name
    if not source.is_dir():
        return None
    target = run.unloadable_dir(source)
    suffix = 1
    while target.exists():  # an earlier unloadable copy of the same step is kept too
        target = target.with_name(f"{run.unloadable_dir(source).name}.{suffix}")
        suffix += 1
    source.rename(target)
    return target


def report_fallback(run: RunFolder, attempt: LoadAttempt) -> None:
    """Rank 0 warns (one line) when the folder loaded is not what `latest` named, moves the
    complete folders that did not load aside and points `latest` at the loaded one (so that a
    later save of a skipped step is not mistaken for one already written). Every rank calls."""
    if dist.is_main() and (attempt.skipped or attempt.latest_name != attempt.loaded.name):
        notes = []
        if attempt.latest_name is None:
            notes.append("no `latest` file")
        elif attempt.latest_name not in {name for name, _ in attempt.skipped} and (
                attempt.latest_name != attempt.loaded.name):
            notes.append(f"`latest` named {attempt.latest_name!r}, not a complete checkpoint")
        for name, why in attempt.skipped:
            moved = _move_aside(run, name)
            where = f", moved to {moved.name}" if moved is not None else ""
            notes.append(f"skipped {name} ({why}{where})")
        log.warning("checkpoint: resumed from %s: %s", attempt.loaded, "; ".join(notes))
        write_bytes_atomic(run.latest_path, f"{attempt.loaded.name}\n".encode())
    dist.barrier()
