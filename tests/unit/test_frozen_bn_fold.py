"""Folding frozen batch norms into convs: the same function, the same state dict, the same
gradients, and only the pairs a conv feeds directly."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

from pipeline.models.backbone import Backbone, BackboneConfig
from pipeline.models.frozen_bn_fold import (
    AbsorbedFrozenBatchNorm2d,
    FoldedFrozenBNConv2d,
    fold_frozen_batch_norms,
)


def _frozen_body(name: str) -> nn.Module:
    torch.manual_seed(0)
    body = freeze_batch_norm_2d(timm.create_model(name, features_only=True, out_indices=(2, 3, 4)))
    with torch.no_grad():  # statistics far from identity, so a wrong fold shows
        for module in body.modules():
            if type(module).__name__ == "FrozenBatchNorm2d":
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return body


@pytest.mark.parametrize("name, expected", [("resnet18", 20), ("resnet50", 53), ("resnet26d", 30)])
def test_folded_backbone_computes_the_same_maps_and_gradients(name, expected):
    reference = _frozen_body(name)
    folded = copy.deepcopy(reference)
    assert fold_frozen_batch_norms(folded) == expected
    images = torch.randn(2, 3, 96, 128)
    outs_ref, outs_fold = reference(images), folded(images)
    for a, b in zip(outs_ref, outs_fold):  # float rounding differs (scale before vs after the sum)
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
    sum(o.square().mean() for o in outs_ref).backward()
    sum(o.square().mean() for o in outs_fold).backward()
    grads_ref = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in folded.named_parameters():
        reference_grad = grads_ref[n]
        torch.testing.assert_close(p.grad, reference_grad, rtol=1e-3, atol=1e-3 * float(reference_grad.abs().max()))


def test_state_dict_keys_and_values_are_unchanged():
    reference = _frozen_body("resnet18")
    folded = copy.deepcopy(reference)
    fold_frozen_batch_norms(folded)
    before, after = reference.state_dict(), folded.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # loading a checkpoint into a folded model updates what the fold uses
    folded.load_state_dict({k: v * 0 if k.endswith("bn1.running_mean") else v for k, v in before.items()})
    assert float(folded.bn1.running_mean.abs().sum()) == 0.0


def test_folding_twice_changes_nothing_and_unfrozen_norms_are_left_alone():
    body = _frozen_body("resnet18")
    fold_frozen_batch_norms(body)
    assert fold_frozen_batch_norms(body) == 0
    assert isinstance(body.conv1, FoldedFrozenBNConv2d) and isinstance(body.bn1, AbsorbedFrozenBatchNorm2d)
    trainable = timm.create_model("resnet18", features_only=True)  # plain BatchNorm2d: statistics move
    assert fold_frozen_batch_norms(trainable) == 0


def test_a_conv_and_a_norm_of_other_widths_are_not_paired():
    class PreNorm(nn.Module):  # bn1 normalises the 3-channel input; conv1 gives 4 channels
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(3)

    model = freeze_batch_norm_2d(PreNorm())
    assert fold_frozen_batch_norms(model) == 0


def test_backbone_folds_its_frozen_norms_only_when_they_are_frozen():
    backbone = Backbone(BackboneConfig(name="resnet18", out_strides=[8, 16, 32], frozen_stages=1))
    assert isinstance(backbone.body.conv1, FoldedFrozenBNConv2d)
    assert isinstance(backbone.body.layer4[1].bn2, AbsorbedFrozenBatchNorm2d)
    assert "body.layer4.1.bn2.running_var" in backbone.state_dict()
    trained_norms = Backbone(BackboneConfig(name="resnet18", out_strides=[8, 16, 32], frozen_bn=False))
    assert type(trained_norms.body.conv1) is nn.Conv2d
