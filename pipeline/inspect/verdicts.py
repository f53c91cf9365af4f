"""Why a ground-truth object was or was not detected: one verdict per object.

The rules, applied to one ground-truth box ``g`` against every query of the image (not only the
top ones), with ``iou(q)`` the IoU of query q's box with ``g`` and ``score(q)`` its score (the
highest class probability, whatever the class: the verdict is about localisation and
confidence; the row next to it shows the class):

- ``missed``: no query has ``iou >= NEAR_IOU`` (0.1): nothing looked at the object;
- ``duplicate``: two or more queries have ``iou >= FOUND_IOU`` (0.5) and ``score >= threshold``;
- ``found``: exactly one query has ``iou >= 0.5`` and ``score >= threshold``;
- ``low_score``: some query has ``iou >= 0.5`` but none of them reaches the threshold;
- ``mislocalised``: otherwise: the best query overlaps (``0.1 <= iou < 0.5``) but no query
  covers the object well, whatever its score.

They are checked in that order, so each object gets exactly one verdict.
"""

from __future__ import annotations

from collections import Counter

from torch import Tensor

VERDICTS = ("found", "low_score", "mislocalised", "duplicate", "missed")
FOUND_IOU = 0.5  # a query covers the object (COCO's AP50 rule)
NEAR_IOU = 0.1  # a query looked at the object at all


def verdict(ious: Tensor, scores: Tensor, threshold: float) -> str:
    """One ground-truth object: ``ious`` (Q,) IoU of every query's box with it, ``scores`` (Q,)
    -> one of ``VERDICTS`` (rules in the module docstring)."""
    if len(ious) == 0 or float(ious.max()) < NEAR_IOU:
        return "missed"
    covering = ious >= FOUND_IOU
    confident = int((covering & (scores >= threshold)).sum())
    if confident >= 2:
        return "duplicate"
    if confident == 1:
        return "found"
    if bool(covering.any()):
        return "low_score"
    return "mislocalised"


def count_verdicts(rows: list[dict]) -> dict[str, int]:
    """{"found": n, ...} over ground-truth rows (each a dict with "verdict"), every verdict listed."""
    counts = Counter(row["verdict"] for row in rows)
    return {name: counts.get(name, 0) for name in VERDICTS}
