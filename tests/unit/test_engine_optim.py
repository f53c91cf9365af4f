"""Parameter groups, optimizer config validation and the weight EMA."""

import pytest
import torch
from torch import nn

from pipeline.engine.ema import EmaConfig, ModelEma
from pipeline.engine.optim import OptimizerConfig, build_optimizer, build_param_groups


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


def test_groups_split_backbone_lr_and_no_decay_params():
    cfg = OptimizerConfig(lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    groups = _groups_by_name(build_param_groups(TinyDetector(), cfg, lambda n: n.startswith("backbone.")))
    assert groups["backbone_decay"]["param_names"] == ["backbone.0.weight"]
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone_decay"]["weight_decay"] == 0.05
    assert sorted(groups["backbone_no_decay"]["param_names"]) == [
        "backbone.0.bias", "backbone.1.bias", "backbone.1.weight"]
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["rest_decay"]["param_names"] == ["head.weight"]
    assert groups["rest_decay"]["lr"] == pytest.approx(1e-3)
    assert sorted(groups["rest_no_decay"]["param_names"]) == [
        "head.bias", "norm.bias", "norm.weight", "pos_embed", "query_embed.weight"]


def test_frozen_parameters_are_left_out():
    groups = build_param_groups(TinyDetector(), OptimizerConfig())
    names = [n for g in groups for n in g["param_names"]]
    assert not any(n.startswith("frozen.") for n in names)
    assert len(names) == len(set(names))


def test_without_predicate_everything_is_rest():
    groups = build_param_groups(TinyDetector(), OptimizerConfig())
    assert {g["name"] for g in groups} == {"rest_decay", "rest_no_decay"}


def test_optimizer_keeps_group_settings():
    model = TinyDetector()
    optimizer = build_optimizer(model, OptimizerConfig(lr=2e-4, backbone_lr_mult=0.5),
                                lambda n: n.startswith("backbone."))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-4, 1e-4, 2e-4, 2e-4])


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "lr must be > 0"),
    ("betas", [0.9], "betas"),
    ("schedule", "poly", "schedule 'poly'"),
    ("milestones", [20, 10], "increasing"),
    ("min_lr_ratio", 1.5, "min_lr_ratio"),
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
