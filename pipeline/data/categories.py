"""Category ids: COCO ids (arbitrary integers, e.g. 1..90 with gaps) <-> contiguous labels 0..C-1.

Models predict contiguous labels; evaluation with pycocotools needs the COCO ids back.
The order is the order of the category records (sorted by id by the converters), so it is the
same on every rank and in every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.data.errors import DataError


class CategoryMap:
    """Bidirectional map between COCO category ids and contiguous labels."""

    def __init__(self, categories: Sequence[dict]) -> None:
        ids = [int(c["id"]) for c in categories]
        if len(set(ids)) != len(ids):
            raise DataError(
                f"duplicate category ids in {ids}; fix the annotation file's categories"
            )
        self.categories = [dict(c) for c in categories]
        self._label_of = {cid: label for label, cid in enumerate(ids)}
        self._ids = torch.tensor(ids, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.categories)

    def __contains__(self, category_id: int) -> bool:
        return int(category_id) in self._label_of

    @property
    def names(self) -> list[str]:
        """Category names in label order."""
        return [str(c.get("name", c["id"])) for c in self.categories]

    def to_label(self, category_id: int) -> int:
        """COCO id -> contiguous label; KeyError for an unknown id."""
        return self._label_of[int(category_id)]

    def to_category_ids(self, labels: Tensor) -> Tensor:
        """(...) int64 contiguous labels -> (...) int64 COCO category ids."""
        return self._ids.to(labels.device)[labels]
