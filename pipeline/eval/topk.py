"""Top-k classification accuracy, per batch and accumulated over an evaluation (all ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


@torch.no_grad()
def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of (B,) labels among the k highest of the (B, K) logits, for each k (k <= K used)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"topk_correct: logits must be (B, K) and labels (B,), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices  # (B, max_k)
    hits = top == labels[:, None].to(top.device)
    return {k: int(hits[:, : min(k, max_k)].any(1).sum()) for k in ks}


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": fraction, "top5": fraction} of (B, K) logits against (B,) labels; 0 when B = 0."""
    correct = topk_correct(logits, labels, ks)
    return {f"top{k}": correct[k] / max(len(labels), 1) for k in ks}


class TopKAccuracy:
    """Accumulates top-k hits over batches; ``compute()`` sums them over ranks when distributed."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"TopKAccuracy: ks must be positive integers, got {ks}")
        self.ks = tuple(ks)
        self.correct = {k: 0 for k in self.ks}
        self.total = 0

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add a batch of (B, K) logits and (B,) int64 labels."""
        for k, hits in topk_correct(logits, labels, self.ks).items():
            self.correct[k] += hits
        self.total += len(labels)

    def compute(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """{"top1": ..., "top5": ...} fractions over everything seen by every rank.

        Distributed: every rank must call it (a collective); ``device`` must suit the backend
        (cuda for NCCL).
        """
        counts = torch.tensor([self.total, *(self.correct[k] for k in self.ks)],
                              dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        total = max(float(counts[0]), 1.0)
        return {f"top{k}": float(counts[i + 1]) / total for i, k in enumerate(self.ks)}
