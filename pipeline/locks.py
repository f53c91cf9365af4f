"""One holder at a time for a run folder or a pipeline folder: an exclusive lock file beside it.

The lock of ``<parent>/<name>`` is ``<parent>/.<name>.lock``, a small JSON file naming its holder
(host, pid, SLURM job id if any, start time, what it does). It lives beside the folder, not in it,
so that archiving the folder (``--force``) does not move the lock with it.

Why a file created with ``O_CREAT | O_EXCL`` and not ``fcntl.flock`` alone: run folders live on
shared cluster file systems (NFS, Lustre), where ``flock`` is either local to one client or not
supported, and a lock held by a SLURM job on another node must be visible from the login node.
Exclusive creation is atomic on NFSv3+ and on the parallel file systems; the holder inside tells
a second taker who is working there and lets it decide whether that holder is still alive.

A lock is stale, and taken over with a warning, when its holder is a dead process on this host,
or a SLURM job that is no longer running (asked through ``job_alive``, a callable that the caller
injects: this library knows nothing about SLURM), or an earlier attempt of the same SLURM job (a
requeued job gets the same job id). A holder whose liveness cannot be told (another host, no
``job_alive``) counts as alive: refusing is safe, the message says how to proceed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# job id -> True (queued or running), False (over), None (cannot tell: no SLURM client, no answer)
JobAlive = Callable[[str], "bool | None"]
# A holder file being written has no content for a moment; one that stays empty this long is junk.
_EMPTY_GRACE_S = 5.0


class LockHeldError(RuntimeError):
    """The folder is worked on by another live holder; the message names it and the way out."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock (the lock file's content)."""

    host: str  # hostname of the holder's process
    pid: int  # its process id on that host
    job_id: str | None  # SLURM job id when it runs in a job
    started: float  # time.time() when the lock was taken
    purpose: str  # what it does there, e.g. "detrforge run" or "stage backbone"
    token: str  # random: tells this taking of the lock from any other
    pid_start: str | None = None  # the pid's start time (/proc), to detect a reused pid

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f"SLURM job {self.job_id}, " if self.job_id else ""
        return f"{self.purpose} ({job}pid {self.pid} on {self.host}, since {since})"

    def how_to_proceed(self, lock_file: Path) -> str:
        stop = (f"`detrforge cancel` or `scancel {self.job_id}`" if self.job_id
                else f"`kill {self.pid}` on {self.host}")
        return (f"wait for it to finish, or stop it ({stop}); if it is no longer running, "
                f"remove {lock_file}")


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: beside it, so that it survives the folder being archived."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _pid_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None elsewhere or when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, pid_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    # The same pid number may now belong to another process (pid reuse after a reboot).
    return pid_start is None or _pid_start(pid) in (None, pid_start)


class FolderLock:
    """Exclusive lock of a folder; use as a context manager or with acquire()/release()."""

    def __init__(self, folder: str | Path, purpose: str, job_alive: JobAlive | None = None,
                 job_id: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = lock_path(self.folder)
        self.purpose = purpose
        self.job_alive = job_alive
        self.job_id = job_id
        self.holder: Holder | None = None  # set while held

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or take over a stale one; LockHeldError when a live holder has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 2 * _EMPTY_GRACE_S
        while time.monotonic() < deadline:
            if self._create():
                return
            found = self._read()
            if found is None:  # being written right now, or junk
                if self._age() > _EMPTY_GRACE_S:
                    self._take_over(None, "it holds no holder")
                time.sleep(0.1)
                continue
            stale = self._stale_reason(found)
            if stale is None:
                raise LockHeldError(f"{self.folder} is in use by {found.describe()}; "
                                    f"{found.how_to_proceed(self.path)}")
            self._take_over(found, stale)
        raise LockHeldError(f"{self.folder}: could not take {self.path} (others keep taking it); "
                            "try again")

    def release(self) -> None:
        """Remove the lock file if it still names this holder (never someone else's)."""
        if self.holder is None:
            return
        found = self._read()
        if found is not None and found.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def _create(self) -> bool:
        holder = Holder(socket.gethostname(), os.getpid(), self.job_id, time.time(), self.purpose,
                        uuid.uuid4().hex, _pid_start(os.getpid()))
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(asdict(holder)) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.holder = holder
        return True

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # partially written or not ours: judged by its age

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _stale_reason(self, holder: Holder) -> str | None:
        """Why ``holder`` no longer holds the lock, or None while it may be alive."""
        if holder.job_id:
            if holder.job_id == self.job_id:
                return f"it was an earlier attempt of this job {holder.job_id} (requeued)"
            alive = self.job_alive(holder.job_id) if self.job_alive else None
            if alive is False:
                return f"SLURM job {holder.job_id} is no longer running"
            if alive is None and holder.host == socket.gethostname() and not _pid_alive(
                    holder.pid, holder.pid_start):
                return f"its process {holder.pid} on this host is gone"
            return None
        if holder.host == socket.gethostname() and not _pid_alive(holder.pid, holder.pid_start):
            return f"its process {holder.pid} on this host is gone"
        return None

    def _take_over(self, stale: Holder | None, why: str) -> None:
        """Move the stale file aside atomically; put it back if it turns out to be a new lock
        (another taker replaced it between our read and our rename)."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:6]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else took it over first: try to create again
        moved = self._read_file(aside)
        if (moved.token if moved else None) != (stale.token if stale else None):
            try:
                os.link(aside, self.path)  # fails if a newer lock exists: then that one wins
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = stale.describe() if stale is not None else "an unreadable holder"
        log.warning("taking over the stale lock %s of %s: %s", self.path, who, why)

    @staticmethod
    def _read_file(path: Path) -> Holder | None:
        try:
            return Holder(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
