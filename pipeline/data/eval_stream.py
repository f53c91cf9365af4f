"""Evaluation streams: every sample of a shard set exactly once over all ranks, in order.

Sample ``i`` (in shard order, numbered with the ``_info.json`` counts) goes to rank
``i % world_size``; within a rank, DataLoader workers split the shards and batches are taken
round-robin from them. No randomness, so every run yields the same batches; ranks may differ
by one batch, and each worker may end with a short batch. Bad samples are skipped and counted
in ``loader.skipped``, as in training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from pipeline.data.shards import ShardInfo
from pipeline.data.stream import Collate, Decoder, LoaderBase, TrainLoader, decode_counting
from pipeline.data.workers import ErrorCounter, NumpyTransfer, make_data_loader


class EvalStream(IterableDataset):
    """Samples of one rank, split over workers by shard, batched (last batch may be short)."""

    def __init__(
        self,
        info: ShardInfo,
        decode: Decoder,
        collate: Collate,
        batch_size: int,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__()
        self.info, self.decode, self.collate = info, decode, collate
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        pack = NumpyTransfer.pack if info is not None else (lambda batch: batch)
        offsets = np.concatenate([[0], np.cumsum(self.info.counts)]).tolist()
        batch, skipped, errors = [], Counter(), ErrorCounter()
        for shard_index in range(worker, len(self.info.shards), workers):
            url = {"url": str(self.info.shard_paths[shard_index])}
            for index, raw in enumerate(wds.tarfile_to_samples(handler=errors)([url])):
                if (offsets[shard_index] + index) % self.world_size != self.rank:
                    continue
                item = decode_counting(self.decode, raw, None, skipped)
                if item is not None:
                    batch.append(item)
                if len(batch) == self.batch_size:
                    yield {
                        "batch": pack(self.collate(batch)),
                        "skipped": dict(skipped + errors.drain()),
                    }
                    batch, skipped = [], Counter()
        if batch or skipped or errors.counts:
            yield {
                "batch": pack(self.collate(batch)) if batch else None,
                "skipped": dict(skipped + errors.drain()),
            }


class EvalLoader(LoaderBase):
    """Every sample of the set exactly once over all ranks, in a deterministic order."""

    def __init__(
        self,
        info: ShardInfo,
        decode: Decoder,
        collate: Collate,
        *,
        batch_size: int,
        num_workers: int,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(info, decode, collate, num_workers)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    @property
    def num_samples(self) -> int:
        """Samples this rank evaluates (per _info.json; bad samples are skipped at read time)."""
        return len(range(self.rank, self.info.num_samples, self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        """An upper bound on batches this rank yields (workers may each end with a short one)."""
        workers = max(1, min(self.num_workers, len(self.info.shards)))
        return -(-self.num_samples // self.batch_size) + workers - 1

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator:
        dataset = EvalStream(
            self.info, self.decode, self.collate, self.batch_size, self.rank, self.world_size
        )
        workers = min(self.num_workers, len(self.info.shards))
        self.skipped = Counter()  # per evaluation pass: each pass reads the same samples
        for item in make_data_loader(dataset, workers):
            self.skipped.update(item["skipped"])
            if item["batch"] is not None:
                yield NumpyTransfer.unpack(item["batch"])

    def state_dict(self) -> dict:
        """Evaluation has no position to keep; only the skip counts."""
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = Counter(state.get("skipped", {}))


def build_split_loader(cfg, info, decode, collate, train: bool, rank: int, world_size: int,
                       seed: int) -> TrainLoader | EvalLoader:
    """The loader of one split from a data config with batch_size, num_workers,
    shuffle_buffer, steps_per_epoch and eval_batch_size (both loader configs have them)."""
    if train:
        steps = cfg.steps_per_epoch or max(1, info.num_samples // (cfg.batch_size * world_size))
        return TrainLoader(
            info, decode, collate, batch_size=cfg.batch_size, steps_per_epoch=steps,
            num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=seed,
            rank=rank, world_size=world_size,
        )  # fmt: skip
    return EvalLoader(
        info, decode, collate, batch_size=cfg.eval_batch_size or cfg.batch_size,
        num_workers=cfg.num_workers, rank=rank, world_size=world_size,
    )  # fmt: skip
