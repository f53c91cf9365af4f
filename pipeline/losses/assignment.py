"""The assignment step of Hungarian matching: many small (queries x targets) problems, one per
image (and per decoder layer), each solved with ``scipy.optimize.linear_sum_assignment``.

The costs arrive as one padded host tensor (N, Q, T_max) with the true target count of each
problem, so the caller makes a single device->host copy per call. Problems without targets skip
scipy. scipy releases the GIL while it solves, so ``pool=True`` spreads the large problems
(crowded images) over a thread pool; it is off by default because it did not pay where it was
measured (benchmarks/matching.py, RESULTS.md: a shared 2-core CPU, where at DETR's usual sizes a
hand-off costs more than a ~10 us solve); a many-core host with crowded images may differ.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# With pool=True, problems with at least this many cost entries go to the pool; smaller ones are
# solved in the calling thread, as a hand-off costs more than their ~10 us solve.
POOL_MIN_ENTRIES = 300 * 50

_pool: ThreadPoolExecutor | None = None


def _worker_pool() -> ThreadPoolExecutor:
    """The process's solver pool, created on first use (not at import: forked loader workers
    never need it)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="lsap")
    return _pool


def _solve_one(cost: Tensor) -> tuple[Tensor, Tensor]:
    """(Q, n) host cost -> (pred_idx, target_idx) int64, pred_idx ascending."""
    if cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    pred_idx, target_idx = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64)


def solve_padded(costs: Tensor, sizes: list[int], pool: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Optimal assignment of each problem ``costs[i, :, :sizes[i]]``.

    Args:
        costs: (N, Q, T_max) finite CPU costs; columns past ``sizes[i]`` are padding, ignored.
        sizes: N target counts, each <= T_max.
        pool: solve the large problems (>= POOL_MIN_ENTRIES cost entries) on a thread pool,
            the others in the calling thread meanwhile.

    Returns:
        N pairs (pred_idx, target_idx), int64 CPU tensors of length min(Q, sizes[i]).
    """
    if costs.device.type != "cpu" or costs.dim() != 3 or len(sizes) != costs.shape[0]:
        raise ValueError(f"solve_padded needs (N, Q, T_max) CPU costs and N sizes; got "
                         f"{tuple(costs.shape)} on {costs.device} and {len(sizes)} sizes")
    problems = [costs[i, :, :size] for i, size in enumerate(sizes)]
    if not pool:
        return [_solve_one(problem) for problem in problems]
    futures = {i: _worker_pool().submit(_solve_one, problem) for i, problem in enumerate(problems)
               if problem.numel() >= POOL_MIN_ENTRIES}
    results = [None if i in futures else _solve_one(problem) for i, problem in enumerate(problems)]
    for i, future in futures.items():
        results[i] = future.result()
    return results


def indices_to(indices: list[tuple[Tensor, Tensor]], device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The solver's CPU index pairs on ``device``, moved in one copy (pinned and non-blocking on
    CUDA). The losses index device tensors with them: a CPU index tensor there would cost one
    blocking host->device copy per image and layer."""
    if device.type == "cpu" or not indices:
        return indices
    lengths = [len(pred) for pred, _ in indices]
    packed = torch.cat([pred for pred, _ in indices] + [target for _, target in indices])
    if device.type == "cuda":
        packed = packed.pin_memory()
    parts = packed.to(device, non_blocking=device.type == "cuda").split(lengths * 2)
    return list(zip(parts[:len(indices)], parts[len(indices):]))
