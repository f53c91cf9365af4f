"""Crash-safe small files: every JSON/YAML record a run writes goes through here.

A write goes to a temporary file in the same folder, is fsynced, renamed over the target with
`os.replace` (atomic on POSIX) and the folder is fsynced, so a reader (or a process started
after a power loss) sees the old file or the new one, never half of one. A file that is
nevertheless corrupt (written by hand, or by an older version in place) is reported by
`read_json` as a `CorruptFileError` naming the file, never as a JSON traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CorruptFileError", "fsync_dir", "read_json", "write_bytes_atomic",
           "write_json_atomic", "write_text_atomic"]


class CorruptFileError(ValueError):
    """A small record file (DONE.json, jobs.json, meta.json, _info.json...) cannot be parsed."""


def fsync_dir(directory: str | Path) -> None:
    """Persist a directory's entries (renames) on POSIX file systems."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write tmp, fsync, rename over `path`, fsync the folder; returns `path`."""
    path = Path(path)
    # The pid keeps two writers of one file (rank 0 of two attempts) off each other's tmp.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, record: Any, *, indent: int | None = 2,
                      sort_keys: bool = True, **dumps_kwargs: Any) -> Path:
    """`record` as JSON (serialised before anything is written: a TypeError leaves the old file)."""
    text = json.dumps(record, indent=indent, sort_keys=sort_keys, **dumps_kwargs)
    return write_text_atomic(path, text + "\n")


def read_json(path: str | Path, *, what: str = "", fix: str = "") -> Any:
    """The JSON in `path`; a truncated or invalid file is a one-line `CorruptFileError` naming
    it and, with `fix`, what to do. A missing file raises FileNotFoundError as usual."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        label = f"{what} " if what else ""
        hint = f"; {fix}" if fix else ""
        raise CorruptFileError(
            f"{label}{path} is corrupt (truncated or not JSON: {err.msg} at line {err.lineno} "
            f"column {err.colno}){hint}"
        ) from None
