"""How batches cross from DataLoader worker processes to the trainer: cheap numpy transfer,
error counting for webdataset readers, pinned images, forked workers with one thread each."""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset


class NumpyTransfer:
    """Batches cross the worker -> trainer queue as numpy arrays, not torch tensors.

    torch moves every tensor through its own shared-memory segment, which costs more than
    the decoding itself for small images with a handful of small target tensors each; pickled
    numpy arrays are one copy. ``torch.from_numpy`` on the other side copies nothing.
    """

    @staticmethod
    def pack(obj):
        if isinstance(obj, torch.Tensor):
            return NumpyTransfer(obj.numpy())
        if isinstance(obj, dict):
            return {k: NumpyTransfer.pack(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(NumpyTransfer.pack(v) for v in obj)
        return obj

    @staticmethod
    def unpack(obj):
        if isinstance(obj, NumpyTransfer):
            return torch.from_numpy(obj.array)
        if isinstance(obj, dict):
            return {k: NumpyTransfer.unpack(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(NumpyTransfer.unpack(v) for v in obj)
        return obj

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


class ErrorCounter:
    """A webdataset exception handler that counts errors instead of raising."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, exn: Exception) -> bool:
        # tarfile errors: a truncated or corrupt shard; the samples read before it are kept.
        tar_error = type(exn).__module__ == "tarfile"
        self.counts["corrupt_tar" if tar_error else f"read_error:{type(exn).__name__}"] += 1
        return True  # go on with the next file or shard

    def drain(self) -> Counter:
        counts, self.counts = self.counts, Counter()
        return counts


def _worker_init(_worker_id: int) -> None:
    """One torch thread per loader worker: workers are processes already, and a worker's torch
    ops are small; more threads per worker only oversubscribe the cores the trainer needs."""
    torch.set_num_threads(1)


def pin_images(batch):
    """``batch["images"]`` in page-locked memory when CUDA is present, so that the copy to the
    GPU (``.to(device, non_blocking=True)``) overlaps compute; unchanged otherwise."""
    if torch.cuda.is_available() and isinstance(batch, dict) and "images" in batch:
        return dict(batch, images=batch["images"].pin_memory())
    return batch


def make_data_loader(dataset: IterableDataset, num_workers: int, persistent: bool = False) -> DataLoader:
    """A DataLoader over an iterable of ready batches, with forked workers where possible.

    Forked, because processes started by ``multiprocessing.spawn`` would otherwise spawn their
    workers too, re-importing torch for every new set of workers (seconds). ``persistent``:
    the workers stay for the next ``iter`` (the training stream's next epoch), where each
    ``iter`` calls the dataset's ``__iter__`` again in every worker.
    """
    if num_workers == 0:
        return DataLoader(dataset, batch_size=None)
    methods = mp.get_all_start_methods()
    context = mp.get_context("fork") if "fork" in methods else None
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2,
        persistent_workers=persistent,
        multiprocessing_context=context,
        worker_init_fn=_worker_init,
    )
