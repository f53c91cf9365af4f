"""Ground truth for the inspector: a COCO instances json, its objects per image file name, in
the model's label order and normalised cx, cy, w, h boxes (what the matcher takes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


class InspectError(ValueError):
    """The inspector's inputs do not fit together; the message names the file and the fix."""


@dataclass
class GroundTruth:
    """The annotated objects of one image (n objects, crowd regions left out)."""

    boxes_xyxy: Tensor  # (n, 4) fp32 pixels of the image as given
    labels: Tensor  # (n,) int64 the model's contiguous labels
    annotation_ids: list[int]  # the json's annotation id of each object

    def target(self, width: int, height: int) -> dict:
        """The matcher's target: {"labels" (n,), "boxes" (n, 4) cx, cy, w, h in [0, 1]}."""
        x0, y0, x1, y1 = self.boxes_xyxy.unbind(-1)
        boxes = torch.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                             (x1 - x0) / width, (y1 - y0) / height], -1)
        return {"labels": self.labels, "boxes": boxes}


def _label_map(coco: dict, categories: list[dict], class_names: list[str], where: str) -> dict[int, int]:
    """json category id -> model label: by id when the model has its data set's categories,
    else by name."""
    by_id = {int(c["id"]): index for index, c in enumerate(categories)}
    by_name = {str(name).lower(): index for index, name in enumerate(class_names)}
    mapping = {}
    for category in coco.get("categories", []):
        name = str(category.get("name", "")).lower()
        label = by_id.get(int(category["id"])) if by_id else by_name.get(name)
        if label is None:
            label = by_name.get(name)
        if label is None:
            raise InspectError(f"{where}: category {category['id']} ({category.get('name')!r}) is "
                               f"not a class of the model ({class_names[:8]}...); pass the "
                               "annotations of the data set the model was trained on")
        mapping[int(category["id"])] = label
    return mapping


def load_ground_truth(path: str | Path, categories: list[dict],
                      class_names: list[str]) -> dict[str, GroundTruth]:
    """COCO instances json -> {image file name (no folder): GroundTruth}."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InspectError(f"{path}: not a readable COCO json ({err})") from None
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise InspectError(f"{path}: needs 'images' and 'annotations' (a COCO instances json)")
    labels = _label_map(coco, categories, class_names, str(path))
    names = {int(image["id"]): Path(image["file_name"]).name for image in coco["images"]}
    objects: dict[str, list[dict]] = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0) or int(ann["image_id"]) not in names:
            continue
        objects[names[int(ann["image_id"])]].append(ann)
    return {name: _ground_truth(anns, labels) for name, anns in objects.items()}


def _ground_truth(annotations: list[dict], labels: dict[int, int]) -> GroundTruth:
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]
    return GroundTruth(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                       torch.tensor([labels[int(a["category_id"])] for a in annotations],
                                    dtype=torch.int64),
                       [int(a.get("id", i)) for i, a in enumerate(annotations)])
