"""Typed errors of the data layer; the CLI turns them into a message and an exit code."""

from __future__ import annotations


class DataError(ValueError):
    """Base class: bad data or a bad data configuration, with a message that names the fix."""


class ShardInfoError(DataError):
    """A shard set's ``_info.json`` is missing, unreadable or inconsistent with the shards."""


class ConversionError(DataError):
    """A converter cannot run at all (missing source, empty input, output not writable)."""


class SkipSample(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised while decoding one sample to skip it; ``reason`` is counted by the loaders."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
