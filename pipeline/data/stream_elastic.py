"""The data position of a training stream resumed with another world size
(``train.elastic_resume``): what carries over from the old ranks' states to each new rank."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pipeline.data.errors import DataError

# What may differ between a checkpoint's data position and the run that resumes it elastically.
ELASTIC_KEYS = ("world_size", "steps_per_epoch")


def resharded_position(saved: Sequence[dict], *, rank: int, world_size: int,
                       fingerprint: dict) -> dict:
    """The state of rank ``rank`` of ``world_size`` ranks continuing the epoch that ``saved``
    (the states of every rank of the old world, equal in epoch and batch count) were in.

    A rank's streams are functions of (seed, epoch, rank, world size), so the old per-stream
    positions mean nothing to the new ranks; what carries over is the epoch and the fraction of
    it already consumed. The old ranks had consumed ``b`` of ``S`` batches; each new rank
    continues at batch ``b' = ceil(b * S' / S)`` of its ``S'`` (``fingerprint``'s
    steps_per_epoch), its streams fast-forwarded past the raw samples ``b'`` batches take
    when none is bad. Guaranteed: the epoch, and with it the seeds of its shard draws and
    shuffles, is kept; the part of the epoch still to read is never longer than at the save
    (rounding up, it may be shorter by less than one batch per rank), so the fractions of
    epoch ``e`` read before and after the resume add up to at most one; from the next epoch
    on, every batch is the one an uninterrupted run with ``world_size`` ranks reads.
    Not guaranteed: which samples the rest of the epoch holds. The new streams are other draws
    from the ranks' new shard parts (with replacement, as every epoch's are), so a sample read
    before the resume may come again in the same epoch, as it may in any epoch. Skip counts
    are kept in total: new rank ``r`` takes those of the old ranks ``i`` with
    ``i % world_size == r``.
    """
    epochs = {(int(s["epoch"]), int(s["batches_in_epoch"])) for s in saved}
    if len(epochs) != 1:
        raise DataError(f"the checkpoint's ranks disagree on the data position {sorted(epochs)}")
    (epoch, consumed), = epochs
    old_steps, new_steps = int(saved[0]["fingerprint"]["steps_per_epoch"]), int(
        fingerprint["steps_per_epoch"])
    batches = min(new_steps, -(-consumed * new_steps // old_steps))
    streams, batch_size = int(fingerprint["num_streams"]), int(fingerprint["batch_size"])
    skipped = Counter()
    for old_rank in range(rank, len(saved), world_size):
        skipped.update(saved[old_rank].get("skipped", {}))
    return {
        "epoch": epoch,
        "batches_in_epoch": batches,
        # Batch g of an epoch comes from stream g % streams (round-robin, see the module doc).
        "positions": [len(range(s, batches, streams)) * batch_size for s in range(streams)],
        "skipped": dict(skipped),
        "fingerprint": fingerprint,
    }
