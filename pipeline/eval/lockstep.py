"""Evaluation batches in lockstep over ranks: every rank runs the same number of forwards.

The evaluation streams give every sample once over all ranks, so ranks may hold different
numbers of batches (one more on the first ranks, a short last batch per worker, skipped bad
samples; ``len(loader)`` is only an upper bound). Under DeepSpeed ZeRO-3 every forward
all-gathers the partitioned weights, so a rank that runs one forward more than the others waits
for ever. Here the ranks agree before each forward whether any of them still has a batch; one
that has run out runs a padding forward on one sample of its last batch (with no batch at all,
one sample lent by the first rank that has one), and the caller discards those outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pipeline import dist
from pipeline.data.collate import model_images


def one_sample(batch: dict) -> dict:
    """The first sample of a batch dict, still batched: tensors and lists cut to length 1 along
    dim 0 (``images`` (1, 3, H, W), ``padding_mask`` (1, H, W), ``targets`` [one dict])."""
    return {key: value[:1] if isinstance(value, torch.Tensor | list | tuple) else value
            for key, value in batch.items()}


def even_batches(batches: Iterable[dict]) -> Iterator[tuple[dict, bool]]:
    """``(batch, real)`` pairs, as many on every rank as the rank with the most batches has.

    ``real`` False marks a padding batch: run the forward (the other ranks' collectives need
    it), then drop its outputs. A single process gets its batches unchanged, with no collective.
    Every rank must consume the iterator to its end.
    """
    if dist.get_world_size() == 1:
        for batch in batches:
            yield batch, True
        return
    iterator = iter(batches)
    batch = next(iterator, None)
    has_batch = dist.all_gather_object(batch is not None)
    if not any(has_batch):
        return
    padding = None
    if not all(has_batch):  # a rank without a single batch pads with a sample lent by another
        lender = has_batch.index(True)
        lent = dist.broadcast_object(one_sample(batch) if batch is not None else None, src=lender)
        padding = lent if batch is None else None
    while True:
        if batch is not None:
            yield batch, True
            padding, batch = batch, next(iterator, None)
        else:
            yield one_sample(padding), False
        if not dist.any_rank(batch is not None):
            return


def evaluation_forwards(batches: Iterable[dict], strategy) -> Iterator[tuple[int, dict, torch.Tensor, dict]]:
    """``(index, batch, images, outputs)`` of every real batch, the model run by ``strategy``
    (its device, compute dtype and autocast) in lockstep over ranks: padding forwards run and
    their outputs are dropped here, so evaluations only ever see real batches."""
    for index, (batch, real) in enumerate(even_batches(batches)):
        images = model_images(batch, strategy.device, strategy.compute_dtype)
        with strategy.autocast():
            outputs = strategy.module(images, batch["padding_mask"].to(strategy.device))
        if real:  # a padding forward only matches the other ranks' (ZeRO-3 gathers)
            yield index, batch, images, outputs
