"""The class-mapping rule of `detrforge finetune`: which pretrained rows new classes keep."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.finetune_classes import (
    ClassMappingError,
    class_indexed_keys,
    map_class_rows,
    match_classes,
    write_mapped_export,
)


def test_names_match_case_and_separator_insensitively():
    mapping = match_classes(["Traffic light", "car", "zebra", "CAR"],
                            ["person", "car", "traffic_light", "bus"])
    assert mapping.source_rows == (2, 1, None, 1)
    assert mapping.kept == {"Traffic light": "traffic_light", "car": "car", "CAR": "car"}


def test_a_pretrained_name_listed_twice_maps_to_its_first_label():
    assert match_classes(["dog"], ["cat", "dog", "Dog"]).source_rows == (1,)


def test_no_common_class_keeps_no_row():
    mapping = match_classes(["a", "b"], ["c"])
    assert mapping.source_rows == (None, None) and "0 of 2" in mapping.describe()


def _heads(num_rows: int, dim: int, fill: float) -> dict[str, torch.Tensor]:
    return {"class_embed.0.weight": torch.full((num_rows, dim), fill),
            "class_embed.0.bias": torch.full((num_rows,), fill),
            "bbox_embed.0.layers.0.weight": torch.full((dim, dim), fill)}


def test_matched_rows_come_from_the_source_the_rest_stay_fresh():
    old, new = ["cat", "dog", "bird"], ["dog", "fish"]
    source = _heads(3, 4, 0.0)
    source["class_embed.0.weight"] = torch.arange(12.0).reshape(3, 4)
    fresh = _heads(2, 4, -7.0)
    out = map_class_rows(source, fresh, match_classes(new, old))
    weight = out["class_embed.0.weight"]
    assert weight.shape == (2, 4)
    assert torch.equal(weight[0], torch.arange(4.0, 8.0))  # dog keeps dog's row
    assert torch.equal(weight[1], torch.full((4,), -7.0))  # fish is new
    assert torch.equal(out["bbox_embed.0.layers.0.weight"], source["bbox_embed.0.layers.0.weight"])


def test_equal_class_counts_are_reordered_not_loaded_as_they_are():
    source = {"class_embed.weight": torch.tensor([[1.0], [2.0], [9.0]])}  # cat, dog, no-object
    fresh = {"class_embed.weight": torch.zeros(3, 1)}
    out = map_class_rows(source, fresh, match_classes(["dog", "cat"], ["cat", "dog"]))
    assert out["class_embed.weight"].flatten().tolist() == [2.0, 1.0, 9.0]  # no-object row kept


def test_extra_rows_follow_the_class_count():
    source = {"label_enc.weight": torch.tensor([[1.0], [2.0], [9.0]])}  # 2 classes + unknown
    fresh = {"label_enc.weight": torch.zeros(4, 1)}  # 3 classes + unknown
    out = map_class_rows(source, fresh, match_classes(["x", "b", "y"], ["a", "b"]))
    assert out["label_enc.weight"].flatten().tolist() == [0.0, 2.0, 0.0, 9.0]


def test_a_class_tensor_of_another_shape_stays_fresh():
    source = {"class_embed.0.weight": torch.ones(2, 8)}
    fresh = {"class_embed.0.weight": torch.zeros(3, 4)}
    out = map_class_rows(source, fresh, match_classes(["a", "b", "c"], ["a", "b"]))
    assert torch.equal(out["class_embed.0.weight"], torch.zeros(3, 4))


def _tiny(kind: str, num_classes: int):
    from pipeline.models.backbone import BackboneConfig
    from pipeline.models.detr import DetectorConfig

    extra = {} if kind == "detr" else {"two_stage": True, "box_refine": True}
    return DetectorConfig(kind=kind, num_classes=num_classes, num_queries=5, hidden_dim=16,
                          enc_layers=1, dec_layers=2, nheads=2, dim_feedforward=32,
                          num_feature_levels=1 if kind == "detr" else 2,
                          backbone=BackboneConfig(name="resnet10t", out_strides=[16, 32]),
                          **extra)


@pytest.mark.parametrize("kind", ["deformable", "dino", "detr"])
def test_class_keys_are_exactly_the_tensors_that_follow_the_class_count(kind):
    from pipeline.models import build_detector

    small = build_detector(_tiny(kind, 3)).state_dict()
    large = build_detector(_tiny(kind, 5)).state_dict()
    changing = sorted(k for k in small if small[k].shape != large[k].shape)
    assert changing and sorted(class_indexed_keys(small)) == changing


def test_mapped_export_keeps_the_rows_and_reuses_itself(tmp_path):
    from pipeline.export import load_export, write_export
    from pipeline.models import build_detector

    cfg = _tiny("deformable", 2)
    model = build_detector(cfg)
    meta = {"kind": "detector", "detector": dataclasses.asdict(cfg), "class_names": ["a", "b"]}
    write_export(tmp_path / "src", model.state_dict(), meta)
    categories = [{"id": 7, "name": "c"}, {"id": 9, "name": "B"}]
    out, mapping = write_mapped_export(tmp_path / "src", categories, tmp_path / "mapped")
    state, new_meta = load_export(out)
    source = model.state_dict()["class_embed.0.weight"]
    assert torch.equal(state["class_embed.0.weight"][1], source[1])
    assert state["class_embed.0.weight"].shape[0] == 2 and mapping.kept == {"B": "b"}
    assert new_meta["class_names"] == ["c", "B"] and new_meta["detector"]["num_classes"] == 2
    assert new_meta["class_mapping"] == {"B": "b"}
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    write_mapped_export(tmp_path / "src", categories, tmp_path / "mapped")
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_segmenter_export_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "segmenter", "class_names": ["a"]}))
    with pytest.raises(ClassMappingError, match="not a detector export"):
        write_mapped_export(tmp_path, [{"id": 1, "name": "a"}], tmp_path / "out")
