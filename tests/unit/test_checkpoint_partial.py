"""Partial loading: what fits is copied, the rest keeps the model's fresh initialisation."""

import pytest
import torch
from torch import nn

from pipeline.export import load_partial
from pipeline.weights import KeyMapError, prefix_renamer


def model(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleDict({"backbone": nn.Linear(4, 8), "head": nn.Linear(8, num_classes)})


def test_fitting_keys_load_and_the_report_names_the_rest():
    source = model(num_classes=3, seed=1).state_dict()
    source["extra.weight"] = torch.zeros(1)
    target = model(num_classes=7, seed=2)
    fresh_head = target["head"].weight.detach().clone()
    report = load_partial(target, source)
    assert sorted(report.loaded) == ["backbone.bias", "backbone.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == [("head.weight", (3, 8), (7, 8)), ("head.bias", (3,), (7,))]
    assert report.missing == [] and not report.complete
    torch.testing.assert_close(target["backbone"].weight, source["backbone.weight"])
    torch.testing.assert_close(target["head"].weight, fresh_head)
    text = str(report)
    assert "loaded 2 tensors" in text and "mismatched: head.weight checkpoint [3, 8] vs model [7, 8]" in text
    assert "unexpected: extra.weight" in text


def test_missing_keys_are_reported():
    target = model()
    report = load_partial(target, {"backbone.weight": torch.zeros(8, 4)})
    assert sorted(report.missing) == ["backbone.bias", "head.bias", "head.weight"]
    assert torch.count_nonzero(target["backbone"].weight) == 0


def test_prefix_map_renames_longest_prefix_first():
    source = {"model.body.weight": torch.ones(8, 4), "model.body.bias": torch.ones(8),
              "model.cls.weight": torch.ones(3, 8)}
    rename = prefix_renamer({"model.": "", "model.body.": "backbone."})
    assert sorted(map(rename, source)) == ["backbone.bias", "backbone.weight", "cls.weight"]
    report = load_partial(model(), source, {"model.body.": "backbone."})
    assert sorted(report.loaded) == ["backbone.bias", "backbone.weight"]


def test_prefix_map_collisions_are_errors():
    with pytest.raises(KeyMapError, match="both map to 'w'"):
        load_partial(nn.Linear(1, 1), {"a.w": torch.zeros(1), "b.w": torch.zeros(1)}, {"a.": "", "b.": ""})


def test_complete_load_reports_complete():
    report = load_partial(model(seed=3), model(seed=4).state_dict())
    assert report.complete and "0 missing" in str(report)
