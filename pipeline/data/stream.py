"""Resumable training streams over shards: resampled epochs with a fixed number of batches.

Training (:class:`TrainLoader`). An epoch is a FIXED number of batches (``steps_per_epoch``),
the same on every rank, so ranks never disagree on batch counts. The batches come from
``num_streams`` independent logical streams (one per DataLoader worker, or one in-process),
taken round-robin: global batch ``g`` of an epoch comes from stream ``g % num_streams``.
Stream ``s`` of rank ``r`` in epoch ``e`` is a pure function of ``(seed, e, r, s)``:

- its shards: the rank's part of the shard list (``shards[r::world_size]`` when there are at
  least ``world_size`` shards, so ranks read disjoint data; all shards otherwise), then the
  stream's part of that (``[s::num_streams]``, when there are enough shards);
- it draws shards from its part at random WITH replacement (webdataset's ``resampled=True``
  behaviour: an infinite stream, so no worker ever runs dry), reads them with webdataset's tar
  reader and shuffles samples in a buffer, both with RNGs seeded from ``(seed, e, r, s)``;
- the augmentation of its ``p``-th raw sample uses an RNG seeded from ``(seed, e, r, s, p)``.

Guarantee: with the same shards, seed, world size, number of workers, batch size and code,
``load_state_dict(state_dict())`` makes the loader yield exactly the batches (bit for bit) that
the uninterrupted loader would have yielded after the batches already consumed. A resume
replays the raw tar bytes of the consumed part of the epoch (cheap: no JPEG decoding, no
augmentation) and skips them; the state is a few integers per stream. A checkpoint of another
world size (``train.elastic_resume``) keeps the epoch and the fraction of it consumed, not the
batches: see :func:`pipeline.data.stream_elastic.resharded_position`.

Bad samples (corrupt JPEG, unreadable JSON, truncated tar, ...) are skipped and counted by reason
in ``loader.skipped``; they never stop training. If a stream reads many shards in a row without
one usable sample, :class:`~pipeline.data.errors.DataError` is raised (the data is unusable).

Evaluation reads each sample exactly once: see :mod:`pipeline.data.eval_stream`.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.categories import CategoryMap
from pipeline.data.errors import DataError, SkipSample
from pipeline.data.shards import ShardInfo
from pipeline.data.stream_elastic import ELASTIC_KEYS, resharded_position
from pipeline.data.workers import ErrorCounter, NumpyTransfer, make_data_loader, pin_images

# decode(raw sample {"__key__", "jpg", ...}, rng or None, annotation-level drop counter) -> item
Decoder = Callable[[dict, "random.Random | None", Counter], object]
Collate = Callable[[list], object]


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers, stable across processes and Python runs (unlike hash()).

    A hash of the parts rather than numpy's SeedSequence: it runs once per sample, and
    SeedSequence costs about as much as decoding a small JPEG.
    """
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def partition_shards(
    shards: Sequence[str], rank: int, world_size: int, stream: int, num_streams: int
) -> list[str]:
    """The shards stream ``stream`` of rank ``rank`` draws from (see the module docstring)."""
    part = list(shards[rank::world_size]) if len(shards) >= world_size else list(shards)
    return part[stream::num_streams] if len(part) >= num_streams else part


@dataclass(frozen=True)
class StreamPlan:
    """What a worker needs to produce its batches (plain data, so it pickles to workers)."""

    shards: tuple[str, ...]
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_streams: int
    batch_size: int
    shuffle_buffer: int
    # Raw samples already consumed from each stream in this epoch (skipped on resume).
    start_positions: tuple[int, ...]
    # Worker j of the new DataLoader plays stream (j + stream_offset) % num_streams.
    stream_offset: int


class _EmptyGuard:
    """Counts shards opened since the last usable sample; raises when the data looks unusable."""

    def __init__(self, shards: Sequence[str]) -> None:
        self.shards, self.since_last_sample = shards, 0
        self.limit = max(20, 5 * len(shards))

    def opened(self) -> None:
        self.since_last_sample += 1
        if self.since_last_sample > self.limit:
            raise DataError(
                f"read {self.limit} shards in a row without one usable sample (e.g. {self.shards[0]});"
                " check the shards with the converter's summary or rewrite them"
            )


def _resampled_urls(
    shards: Sequence[str], rng: random.Random, guard: _EmptyGuard
) -> Iterator[dict]:
    while True:
        guard.opened()
        yield {"url": shards[rng.randrange(len(shards))]}


def _fill_counts_as_progress(samples: Iterator[dict], guard: _EmptyGuard, fill: int) -> Iterator[dict]:
    """Samples read while the shuffle buffer fills reset the guard; later only usable ones do."""
    for read, sample in enumerate(samples, start=1):
        if read <= fill:
            guard.since_last_sample = 0
        yield sample


class TrainStream(IterableDataset):
    """The batches of an epoch's streams (an IterableDataset for torch's DataLoader).

    The first pass plays ``plan`` (its epoch, from its positions); each later pass over the same
    object, as persistent workers make them, plays the next epoch from its start."""

    def __init__(self, plan: StreamPlan, decode: Decoder, collate: Collate) -> None:
        super().__init__()
        self.plan, self.decode, self.collate = plan, decode, collate
        self.passes = 0  # in this process: a worker counts its own passes

    def next_plan(self) -> StreamPlan:
        """The plan of this pass (and count it)."""
        plan = self.plan
        if self.passes:
            plan = replace(plan, epoch=plan.epoch + self.passes,
                           start_positions=(0,) * plan.num_streams, stream_offset=0)
        self.passes += 1
        return plan

    def __iter__(self) -> Iterator[dict]:
        plan, info = self.next_plan(), torch.utils.data.get_worker_info()
        if info is not None:
            for item in self._batches(plan, (info.id + plan.stream_offset) % plan.num_streams):
                yield dict(item, batch=NumpyTransfer.pack(item["batch"]))
            return
        # In-process: interleave the streams exactly as DataLoader workers would be.
        order = [(plan.stream_offset + j) % plan.num_streams for j in range(plan.num_streams)]
        streams = [self._batches(plan, s) for s in order]
        while True:
            for stream in streams:
                yield next(stream)

    @staticmethod
    def _raw_samples(plan: StreamPlan, stream: int, guard: _EmptyGuard,
                     errors: ErrorCounter) -> Iterator[dict]:
        shards = partition_shards(plan.shards, plan.rank, plan.world_size, stream, plan.num_streams)
        shard_rng = random.Random(mix_seed(plan.seed, plan.epoch, plan.rank, stream, 0))
        shuffle_rng = random.Random(mix_seed(plan.seed, plan.epoch, plan.rank, stream, 1))
        samples = wds.tarfile_to_samples(handler=errors)(_resampled_urls(shards, shard_rng, guard))
        # While the shuffle buffer fills no sample comes out, however good the data: a buffer
        # larger than 20 small shards would otherwise look like unusable data.
        samples = _fill_counts_as_progress(samples, guard, plan.shuffle_buffer)
        if plan.shuffle_buffer > 1:
            samples = wds.shuffle(plan.shuffle_buffer, plan.shuffle_buffer, rng=shuffle_rng)(
                samples
            )
        return samples

    def _batches(self, plan: StreamPlan, stream: int) -> Iterator[dict]:
        guard, errors = _EmptyGuard(plan.shards), ErrorCounter()
        batch, skipped = [], Counter()
        for position, raw in enumerate(self._raw_samples(plan, stream, guard, errors), start=1):
            read_errors = errors.drain()
            if position <= plan.start_positions[stream]:
                guard.since_last_sample = 0  # replaying a consumed part is progress too
                continue  # consumed before the resume; its errors were counted then
            skipped.update(read_errors)
            rng = random.Random(mix_seed(plan.seed, plan.epoch, plan.rank, stream, 2, position))
            item = decode_counting(self.decode, raw, rng, skipped)
            if item is None:
                continue
            guard.since_last_sample = 0
            batch.append(item)
            if len(batch) == plan.batch_size:
                yield {
                    "batch": self.collate(batch),
                    "stream": stream,
                    "position": position,
                    "skipped": dict(skipped),
                }
                batch, skipped = [], Counter()


def decode_counting(decode: Decoder, raw: dict, rng: random.Random | None, skipped: Counter):
    """decode(raw) or None, counting the reason of a skip; one bad sample never raises."""
    try:
        return decode(raw, rng, skipped)
    except SkipSample as skip:
        skipped[skip.reason] += 1
    except Exception as exn:  # noqa: BLE001 - any failure on one sample skips that sample only
        skipped[f"decode_error:{type(exn).__name__}"] += 1
    return None


class LoaderBase:
    """What both loaders expose: the shard set, categories, counts of skipped samples."""

    def __init__(
        self, info: ShardInfo, decode: Decoder, collate: Collate, num_workers: int
    ) -> None:
        self.info, self.decode, self.collate = info, decode, collate
        self.num_workers = num_workers
        self.skipped: Counter = Counter()

    @property
    def categories(self) -> list[dict]:
        """COCO-style category records; contiguous label i is categories[i]."""
        return self.info.categories

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def category_map(self) -> CategoryMap:
        """COCO category id <-> contiguous label (evaluation maps predictions back with it)."""
        return CategoryMap(self.info.categories)


class TrainLoader(LoaderBase):
    """Iterating yields the rest of the current epoch; the next iteration starts the next epoch."""

    def __init__(
        self,
        info: ShardInfo,
        decode: Decoder,
        collate: Collate,
        *,
        batch_size: int,
        steps_per_epoch: int,
        num_workers: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(info, decode, collate, num_workers)
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.shuffle_buffer, self.seed, self.rank, self.world_size = (
            shuffle_buffer,
            seed,
            rank,
            world_size,
        )
        self.num_streams = max(1, num_workers)
        self.epoch, self.batches_in_epoch = 0, 0
        self.positions = [0] * self.num_streams
        # Workers kept from one epoch to the next, and the epoch they play when iterated next.
        self._workers: DataLoader | None = None
        self._workers_epoch = -1

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _roll_epoch_if_done(self) -> None:
        if self.batches_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            self.positions = [0] * self.num_streams

    def _plan(self) -> StreamPlan:
        return StreamPlan(
            shards=tuple(str(p) for p in self.info.shard_paths),
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            num_streams=self.num_streams,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            start_positions=tuple(self.positions),
            stream_offset=self.batches_in_epoch % self.num_streams,
        )

    def __iter__(self) -> Iterator:
        self._roll_epoch_if_done()
        remaining = self.steps_per_epoch - self.batches_in_epoch
        batches = self._epoch_batches()
        finished = False
        try:
            for _ in range(remaining):
                item = next(batches)
                # State first: a batch counts as consumed as soon as it is handed out.
                self.positions[item["stream"]] = item["position"]
                self.batches_in_epoch += 1
                self.skipped.update(item["skipped"])
                yield pin_images(NumpyTransfer.unpack(item["batch"]))
            finished = True
        finally:
            del batches
            if not finished:  # stopped mid-epoch: the workers are ahead of the position
                self.close()
        self._roll_epoch_if_done()

    def _epoch_batches(self) -> Iterator[dict]:
        """The current epoch's batches, from the workers of the previous epoch when it was read
        to its end (they go on with the next epoch), else from new workers that start at the
        saved position.

        Workers outlive an epoch because a forked worker makes the trainer copy every memory
        page it writes afterwards: 1-2 s at the start of every epoch of the tiny detector on
        2 CPU cores, about what 5 steps cost."""
        if self._workers_epoch != self.epoch or self.batches_in_epoch:  # -1: no workers
            self.close()
            stream = TrainStream(self._plan(), self.decode, self.collate)
            self._workers = make_data_loader(stream, self.num_workers, persistent=True)
            self._workers_epoch = self.epoch
        self._workers_epoch += 1
        return iter(self._workers)

    def close(self) -> None:
        """Stop the workers (the next iteration starts new ones at the current position)."""
        self._workers, self._workers_epoch = None, -1

    def state_dict(self) -> dict:
        """The data position: plain ints and strings (JSON- and torch.save-friendly)."""
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "positions": list(self.positions),
            "skipped": dict(self.skipped),
            "fingerprint": self._fingerprint(),
        }

    def _fingerprint(self) -> dict:
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "num_streams": self.num_streams,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "shards": list(self.info.shards),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; DataError if it was saved with another data setup."""
        mine, theirs = self._fingerprint(), state.get("fingerprint", {})
        changed = sorted(k for k in mine if theirs.get(k) != mine[k])
        if changed:
            raise DataError(
                f"cannot resume the data position: {changed} changed since the checkpoint "
                f"({ {k: theirs.get(k) for k in changed} } -> { {k: mine[k] for k in changed} }); "
                "resume with the same data settings, or start the stage afresh"
            )
        self.close()
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
        self.positions = [int(p) for p in state["positions"]]
        self.skipped = Counter(state.get("skipped", {}))

    def load_resharded_state_dict(self, saved: Sequence[dict]) -> None:
        """Continue from the states every rank of a run with another world size saved
        (train.elastic_resume); see :func:`resharded_position` for what is kept."""
        mine = self._fingerprint()
        for state in saved:
            theirs = state.get("fingerprint", {})
            changed = sorted(k for k in mine if k not in ELASTIC_KEYS and theirs.get(k) != mine[k])
            if changed or theirs.get("world_size") != len(saved):
                raise DataError(
                    f"cannot re-derive the data position for {self.world_size} ranks: "
                    f"{changed or ['world_size']} differ from the checkpoint's; resume with the "
                    "same data settings, or start the stage afresh"
                )
        self.load_state_dict(resharded_position(
            saved, rank=self.rank, world_size=self.world_size, fingerprint=mine))
