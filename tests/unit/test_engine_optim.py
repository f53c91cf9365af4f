"""Parameter groups, optimizer config validation and the weight EMA."""

import pytest
import torch
from torch import nn

from pipeline.engine.ema import EmaConfig, ModelEma
from pipeline.engine.optim import OptimizerConfig, build_optimizer, build_param_groups
from pipeline.models import DetectorConfig, build_detector
from pipeline.models.backbone import BackboneConfig


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.query_embed = nn.Embedding(5, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _groups_by_name(groups):
    return {group["name"]: group for group in groups}


def _backbone_or_default(name: str) -> str:
    return "backbone" if name.startswith("backbone.") else "default"


def test_groups_split_backbone_lr_and_no_decay_params():
    cfg = OptimizerConfig(lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    groups = _groups_by_name(build_param_groups(TinyDetector(), cfg, _backbone_or_default))
    assert groups["backbone_decay"]["param_names"] == ["backbone.0.weight"]
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone_decay"]["weight_decay"] == 0.05
    assert sorted(groups["backbone_no_decay"]["param_names"]) == [
        "backbone.0.bias", "backbone.1.bias", "backbone.1.weight"]
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["default_decay"]["param_names"] == ["head.weight"]
    assert groups["default_decay"]["lr"] == pytest.approx(1e-3)
    assert sorted(groups["default_no_decay"]["param_names"]) == [
        "head.bias", "norm.bias", "norm.weight", "pos_embed", "query_embed.weight"]


def test_frozen_parameters_are_left_out():
    groups = build_param_groups(TinyDetector(), OptimizerConfig())
    names = [n for g in groups for n in g["param_names"]]
    assert not any(n.startswith("frozen.") for n in names)
    assert len(names) == len(set(names))


def test_without_group_of_everything_is_default():
    groups = build_param_groups(TinyDetector(), OptimizerConfig())
    assert {g["name"] for g in groups} == {"default_decay", "default_no_decay"}


def test_unknown_group_name_is_an_error():
    with pytest.raises(ValueError, match="group 'head'"):
        build_param_groups(TinyDetector(), OptimizerConfig(), lambda name: "head")


def _lr_of_each_parameter(model, cfg):
    optimizer = build_optimizer(model, cfg, model.param_group)
    return {name: group["lr"] for group in optimizer.param_groups for name in group["param_names"]}


def test_detector_groups_get_the_paper_learning_rates():
    model = build_detector(DetectorConfig(
        num_classes=3, num_queries=10, hidden_dim=32, enc_layers=1, dec_layers=2, nheads=2,
        dim_feedforward=64, num_feature_levels=3, enc_n_points=2, dec_n_points=2,
        backbone=BackboneConfig(name="resnet18", out_strides=[8, 16, 32], frozen_stages=1)))
    lrs = _lr_of_each_parameter(model, OptimizerConfig(lr=1e-3, backbone_lr_mult=0.2))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(lrs) == trainable  # frozen stem + layer1 left out, every other parameter once
    assert "backbone.body.conv1.weight" not in lrs and "backbone.body.layer2.0.conv1.weight" in lrs
    by_kind: dict[str, set[float]] = {"body": set(), "linear_proj": set(), "rest": set()}
    for name, lr in lrs.items():
        kind = ("body" if name.startswith("backbone.body.") else "linear_proj"
                if "sampling_offsets" in name or "reference_points" in name else "rest")
        by_kind[kind].add(round(lr, 12))
    assert by_kind == {"body": {2e-4}, "linear_proj": {1e-4}, "rest": {1e-3}}  # linear_proj: x 0.1
    assert "transformer.reference_points.weight" in lrs
    assert any("sampling_offsets" in name for name in lrs)


def test_vit_pyramid_trains_at_the_full_lr():
    model = build_detector(DetectorConfig(
        num_classes=3, num_queries=10, hidden_dim=32, enc_layers=1, dec_layers=1, nheads=2,
        dim_feedforward=64, num_feature_levels=3, enc_n_points=2, dec_n_points=2,
        backbone=BackboneConfig(name="vit_tiny_patch16_224", out_strides=[8, 16, 32],
                                model_kwargs={"depth": 1})))
    lrs = _lr_of_each_parameter(model, OptimizerConfig(lr=1e-3, backbone_lr_mult=0.1))
    pyramid = [name for name in lrs if name.startswith("backbone.pyramid.")]
    body = [name for name in lrs if name.startswith("backbone.body.")]
    assert pyramid and body
    assert {round(lrs[name], 12) for name in pyramid} == {1e-3}  # fresh layers: default lr
    assert {round(lrs[name], 12) for name in body} == {1e-4}


def test_optimizer_keeps_group_settings():
    model = TinyDetector()
    optimizer = build_optimizer(model, OptimizerConfig(lr=2e-4, backbone_lr_mult=0.5),
                                _backbone_or_default)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-4, 1e-4, 2e-4, 2e-4])


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "lr must be > 0"),
    ("betas", [0.9], "betas"),
    ("schedule", "poly", "schedule 'poly'"),
    ("milestones", [20, 10], "increasing"),
    ("min_lr_ratio", 1.5, "min_lr_ratio"),
    ("linear_proj_lr_mult", -1.0, "linear_proj_lr_mult"),
])
def test_optimizer_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**{field: value})


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(model, OptimizerConfig())


def test_ema_follows_weights_and_round_trips():
    model = nn.Linear(2, 1)
    ema = ModelEma(model, EmaConfig(enabled=True, decay=0.5, warmup=False))
    with torch.no_grad():
        model.weight.fill_(1.0)
    before = ema.shadow["weight"].clone()
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.5 * before + 0.5)
    restored = ModelEma(nn.Linear(2, 1), EmaConfig(enabled=True, decay=0.5))
    restored.load_state_dict(ema.state_dict())
    target = nn.Linear(2, 1)
    restored.copy_to(target)
    torch.testing.assert_close(target.weight, ema.shadow["weight"])
    assert restored.updates == 1


def test_ema_warmup_starts_fast():
    ema = ModelEma(nn.Linear(2, 1), EmaConfig(enabled=True, decay=0.999))
    assert ema.decay_now() == pytest.approx(0.1)


def test_ema_refuses_zero3_partitioned_params():
    model = nn.Linear(2, 1)
    model.weight.ds_id = 0  # what ZeRO-3 attaches to partitioned parameters
    with pytest.raises(NotImplementedError, match="ZeRO stage 3"):
        ModelEma(model, EmaConfig(enabled=True))
