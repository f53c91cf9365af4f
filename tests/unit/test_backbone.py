"""Backbone contract over timm families: channels/strides from feature_info, sizes, freezing,
weight loading from classifier state dicts."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.models.backbone import Backbone, BackboneBuildError, BackboneConfig, build_backbone
from pipeline.models.backbone_weights import WeightsFileError, load_backbone_weights

# the smallest variants (reduced depth / width through model_kwargs where timm allows)
FAMILIES = {
    "resnet": ("resnet18", {}),
    "convnext": ("convnext_atto", {}),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))),
    "vit": ("vit_tiny_patch16_224", dict(depth=2)),
}


def make(family: str, **overrides) -> Backbone:
    name, kwargs = FAMILIES[family]
    return build_backbone(BackboneConfig(name=name, model_kwargs=kwargs, **overrides))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_contract_channels_strides_and_sizes(family):
    torch.manual_seed(0)
    backbone = make(family, out_strides=[8, 16, 32]).eval()
    info = backbone.body.feature_info
    assert backbone.strides == [8, 16, 32]
    if family != "vit":
        by_stride = dict(zip(info.reduction(), info.channels()))
        assert backbone.num_channels == [by_stride[s] for s in (8, 16, 32)]
    images = torch.randn(2, 3, 70, 90)  # sides divisible by no stride: padding/cropping must hold
    with torch.no_grad():
        features = backbone(images)
    assert len(features) == 3
    for feature, channels, stride in zip(features, backbone.num_channels, backbone.strides):
        assert feature.shape == (2, channels, math.ceil(70 / stride), math.ceil(90 / stride))
        assert torch.isfinite(feature).all()


def test_vit_pyramid_built_from_single_stride16_map():
    backbone = make("vit", out_strides=[4, 8, 16, 32])
    assert backbone.body.feature_info.reduction() == [16]
    channels = backbone.body.feature_info.channels()[-1]
    assert backbone.num_channels == [channels // 4, channels // 2, channels, channels]


def test_unavailable_stride_is_a_clear_error():
    with pytest.raises(BackboneBuildError, match="feature strides"):
        make("convnext", out_strides=[2, 8])


def test_config_validation():
    with pytest.raises(ValueError, match="ascending"):
        BackboneConfig(out_strides=[32, 16])
    with pytest.raises(ValueError, match="powers of two"):
        BackboneConfig(out_strides=[12])


def test_frozen_bn_and_first_stages():
    backbone = make("resnet", frozen_bn=True, frozen_stages=2)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    frozen = {n for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in frozen and any(n.startswith("layer1.") for n in frozen)
    assert not any(n.startswith("layer2.") for n in frozen)


def test_set_frozen_stops_gradients_and_releases():
    backbone = make("resnet", frozen_bn=False).train()
    images = torch.randn(1, 3, 64, 64)
    backbone.set_frozen(True)
    assert not backbone.body.training  # BatchNorm statistics are not updated while frozen
    out = backbone(images)
    assert not any(f.requires_grad for f in out)
    backbone.set_frozen(False)
    assert backbone.body.training
    sum(f.sum() for f in backbone(images)).backward()
    assert backbone.body.conv1.weight.grad is not None


@pytest.mark.parametrize("family", ["resnet", "convnext", "vit"])
@pytest.mark.parametrize("prefix", ["", "model."])
def test_loads_classifier_state_dict_into_features_only(family, prefix, tmp_path):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(1)
    classifier = timm.create_model(name, pretrained=False, **kwargs)
    path = tmp_path / "export.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    torch.manual_seed(2)
    backbone = make(family, frozen_bn=False)
    report = load_backbone_weights(backbone, path)
    assert report.missing == [] and report.mismatched == []
    assert report.unexpected and all(("head" in k or "fc" in k or "norm" in k) for k in report.unexpected)
    source = classifier.state_dict()
    for key, tensor in backbone.body.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        original = key.removeprefix("model.").replace("stages_", "stages.").replace("stem_", "stem.")
        torch.testing.assert_close(tensor, source[original], msg=key)


def test_loads_wrapped_pth_checkpoint_with_weights_only(tmp_path):
    torch.manual_seed(3)
    classifier = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in classifier.state_dict().items()}, "epoch": 3}, path)
    backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(path)))
    torch.testing.assert_close(backbone.body.layer1[0].conv1.weight, classifier.layer1[0].conv1.weight)


def test_unrelated_weights_are_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"decoder.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(WeightsFileError, match="matches"):
        load_backbone_weights(make("resnet"), path)
    with pytest.raises(WeightsFileError, match="no weights file"):
        load_backbone_weights(make("resnet"), tmp_path / "missing.pth")


def test_pretrained_offline_without_cache_is_a_quick_one_line_error(tmp_path, monkeypatch):
    """pretrained: true never downloads here: offline with an empty cache it says what to do."""
    import time

    from huggingface_hub import constants

    from launch.errors import is_user_error, one_line
    from pipeline.models.backbone import PretrainedWeightsUnavailable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as caught:
        build_backbone(BackboneConfig(name="resnet18", pretrained=True))
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "\n" not in message and one_line(caught.value) == message and is_user_error(caught.value)
    assert "'resnet18'" in message and "HF_HUB_OFFLINE" in message
    assert "backbone.weights" in message
    assert not any((tmp_path / "hub").rglob("*.safetensors"))


def test_local_weights_win_over_pretrained(tmp_path, monkeypatch):
    """With a local file nothing is downloaded, even offline with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    classifier = timm.create_model("resnet18", pretrained=False, num_classes=3)
    save_file(classifier.state_dict(), str(tmp_path / "w.safetensors"))
    backbone = build_backbone(
        BackboneConfig(name="resnet18", pretrained=True, weights=str(tmp_path / "w.safetensors"))
    )
    assert torch.equal(backbone.body.conv1.weight, classifier.conv1.weight)
