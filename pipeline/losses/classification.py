"""Classification losses for backbone pretraining: label-smoothing and soft-target cross-entropy.

Hard labels (B,) int64 use label smoothing; soft targets (B, K) float (from mixup / cutmix, rows
summing to 1) use the soft-target cross-entropy. Both are means over the batch, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class ClassificationLossConfig:
    """Cross-entropy settings of the classification (backbone) stage."""

    label_smoothing: float = 0.1  # probability mass spread uniformly over all K classes

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("ClassificationLossConfig.label_smoothing must lie in [0, 1), got "
                             f"{self.label_smoothing}")


def label_smoothing_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float = 0.1) -> Tensor:
    """Mean CE of (B, K) logits against int64 (B,) labels smoothed to (1 - s) one-hot + s / K."""
    log_prob = logits.float().log_softmax(-1)
    nll = -log_prob.gather(-1, labels[:, None].long())[:, 0]
    uniform = -log_prob.mean(-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


def soft_target_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Mean CE of (B, K) logits against (B, K) target distributions: mean_b sum_k -t log p."""
    return (-soft_targets.float() * logits.float().log_softmax(-1)).sum(-1).mean()


class ClassificationLoss(nn.Module):
    """``loss(logits (B, K), targets int64 (B,) or float (B, K)) -> fp32 scalar``."""

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        ClassificationLossConfig(label_smoothing)  # validates
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.dim() != 2:
            raise ValueError(f"ClassificationLoss: logits must be (B, K), got {tuple(logits.shape)}")
        if targets.is_floating_point():
            if targets.shape != logits.shape:
                raise ValueError(f"ClassificationLoss: soft targets {tuple(targets.shape)} must "
                                 f"match logits {tuple(logits.shape)}")
            return soft_target_cross_entropy(logits, targets)
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"ClassificationLoss: labels must be (B,) = ({logits.shape[0]},), got "
                             f"{tuple(targets.shape)}")
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
            raise ValueError(f"ClassificationLoss: labels must lie in [0, {logits.shape[1]}), got "
                             f"[{int(targets.min())}, {int(targets.max())}]; check num_classes")
        return label_smoothing_cross_entropy(logits, targets, self.label_smoothing)


def build_classification_loss(cfg: ClassificationLossConfig) -> ClassificationLoss:
    """The loss described by ``cfg``."""
    return ClassificationLoss(label_smoothing=cfg.label_smoothing)
