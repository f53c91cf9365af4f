"""Reading a resumable training loader batch by batch across epoch ends, for resume tests."""

from __future__ import annotations

from collections.abc import Callable


def take_batches(loader, count: int, fingerprint: Callable[[dict], object]) -> list:
    """``fingerprint`` of the next ``count`` batches, re-iterating the loader at epoch ends."""
    out = []
    while len(out) < count:
        for batch in loader:
            out.append(fingerprint(batch))
            if len(out) == count:
                break
    return out
