"""Recipes -> typed configs: merging, overrides, errors that name the fix, stable hashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    absolutize_overrides,
    config_hash,
    load_config,
    path_field,
    resolve_path,
    write_resolved,
)


@dataclass
class OptimCfg:
    lr: float = 1e-4  # base learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    schedule: Literal["cosine", "step"] = "cosine"  # lr schedule

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class TrainCfg:
    max_steps: int = 10  # optimizer steps
    scales: list[int] = field(default_factory=lambda: [480, 512])  # shorter sides
    init_from: str | None = None  # export path


@dataclass
class RecipeCfg:
    name: str = "x"  # run name
    train: TrainCfg = field(default_factory=TrainCfg)  # training loop
    optim: OptimCfg = field(default_factory=OptimCfg)  # optimizer


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_merge_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"name": "base", "train": {"max_steps": 5, "scales": [1, 2]}})
    recipe = write(tmp_path / "r.yaml", {"base": "base.yaml", "train": {"max_steps": 7}})
    cfg = load_config(recipe, RecipeCfg, ["optim.lr=3e-4", "train.scales=[8, 16]",
                                          "optim.betas=[0.8, 0.9]"])
    assert cfg.name == "base"
    assert cfg.train.max_steps == 7
    assert cfg.train.scales == [8, 16]
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.8, 0.9)


def test_typo_in_file_names_key_file_and_suggestion(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"train": {"max_stesp": 7}})
    with pytest.raises(ConfigError) as err:
        load_config(recipe, RecipeCfg)
    msg = str(err.value)
    assert "train.max_stesp" in msg and "train.max_steps" in msg and str(recipe) in msg


def test_typo_in_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", {"optim": {"lrr": 1.0}})
    recipe = write(tmp_path / "r.yaml", {"base": "base.yaml"})
    with pytest.raises(ConfigError, match="base.yaml.*optim.lrr.*optim.lr'"):
        load_config(recipe, RecipeCfg)
    assert base.exists()


def test_typo_in_override(tmp_path):
    recipe = write(tmp_path / "r.yaml", {})
    with pytest.raises(ConfigError, match=r"command line.*'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(recipe, RecipeCfg, ["optim.lrr=1"])


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=abc", "expects int"),
    ("train.max_steps=1.5", "expects int"),
    ("optim.schedule=linear", "must be one of"),
    ("optim.lr=-1", "lr must be > 0"),
    ("train.scales=5", "expects list"),
    ("train=3", "expected a mapping"),
])
def test_type_errors(tmp_path, override, expected):
    recipe = write(tmp_path / "r.yaml", {})
    with pytest.raises(ConfigError, match=expected):
        load_config(recipe, RecipeCfg, [override])


def test_optional_and_int_to_float(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"optim": {"lr": 1}, "train": {"init_from": None}})
    cfg = load_config(recipe, RecipeCfg, ["train.init_from=stage:detr"])
    assert isinstance(cfg.optim.lr, float)
    assert cfg.train.init_from == "stage:detr"


def test_hash_stable_and_sensitive(tmp_path):
    a = write(tmp_path / "a.yaml", {"train": {"max_steps": 7}, "optim": {"lr": 1}})
    b = write(tmp_path / "b.yaml", {"optim": {"lr": 1.0}, "train": {"max_steps": 7}})
    ha, hb = config_hash(load_config(a, RecipeCfg)), config_hash(load_config(b, RecipeCfg))
    assert ha == hb and len(ha) == 12
    assert config_hash(load_config(a, RecipeCfg, ["train.max_steps=8"])) != ha



def test_hash_same_in_another_process(tmp_path):
    """No id(), set order or hash randomisation leaks into the hash."""
    import os
    import subprocess
    import sys

    recipe = write(tmp_path / "a.yaml", {"train": {"max_steps": 7}})
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_config import *; "
            "print(config_hash(load_config(sys.argv[2], RecipeCfg)))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(recipe)],
                         capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert out == config_hash(load_config(recipe, RecipeCfg))


def test_write_resolved_round_trips(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"train": {"max_steps": 3}})
    cfg = load_config(recipe, RecipeCfg)
    out = write_resolved(cfg, tmp_path / "run" / "config.yaml", extra={"global_batch": 8})
    text = out.read_text()
    assert text.startswith(f"# config_hash: {config_hash(cfg)}")
    data = yaml.safe_load(text)
    assert data["derived"] == {"global_batch": 8}
    data.pop("derived")
    again = write(tmp_path / "again.yaml", data)
    assert config_hash(load_config(again, RecipeCfg)) == config_hash(cfg)


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml", RecipeCfg)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", RecipeCfg)


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "1e999"])
def test_non_finite_numbers_are_errors_naming_the_key(tmp_path, value):
    recipe = write(tmp_path / "r.yaml", {"name": "x"})
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be a finite number"):
        load_config(recipe, RecipeCfg, [f"optim.lr={value}"])
    (tmp_path / "f.yaml").write_text(f"optim:\n  lr: {value}\n")
    with pytest.raises(ConfigError, match=r"f\.yaml: 'optim\.lr' must be a finite"):
        load_config(tmp_path / "f.yaml", RecipeCfg)


def test_null_switches_an_optional_field_off(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"init_from": "stage:detr"}})
    recipe = write(tmp_path / "r.yaml", {"base": "base.yaml", "train": {"init_from": None}})
    assert load_config(recipe, RecipeCfg).train.init_from is None
    base = tmp_path / "base.yaml"
    assert load_config(base, RecipeCfg, ["train.init_from=null"]).train.init_from is None


@dataclass
class DataCfg:
    shards: str = path_field()  # shard root
    name: str = "plain"  # not a path: never rewritten


@dataclass
class PathsCfg:
    data: DataCfg
    init_from: str | None = path_field(default=None)  # export path or a reference


def test_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "base").mkdir(parents=True)
    write(tmp_path / "recipes" / "base" / "b.yaml", {"data": {"shards": "../../data/x"}})
    recipe = write(tmp_path / "recipes" / "r.yaml",
                   {"base": "base/b.yaml", "data": {"name": "../y"}, "init_from": "exports/e"})
    monkeypatch.chdir(tmp_path / "recipes" / "base")  # the working folder does not matter
    cfg = load_config(recipe, PathsCfg)
    assert cfg.data.shards == str(tmp_path / "data" / "x")  # relative to the base file
    assert cfg.init_from == str(tmp_path / "recipes" / "exports" / "e")  # to the recipe
    assert cfg.data.name == "../y"

    monkeypatch.chdir(tmp_path)  # on the command line: relative to the current folder
    cfg = load_config(recipe, PathsCfg, ["data.shards=d", "init_from=stage:detr"])
    assert cfg.data.shards == str(tmp_path / "d") and cfg.init_from == "stage:detr"
    cfg = load_config(recipe, PathsCfg, ["init_from=models:/demo.detr@production"])
    assert cfg.init_from == "models:/demo.detr@production"


def test_absolutize_overrides_rewrites_path_fields_only(tmp_path):
    out = absolutize_overrides(["data.shards=../d", "data.name=../n", "init_from=stage:x",
                                "init_from=/abs/e", "nokey"], PathsCfg, tmp_path / "pipes")
    assert out == [f"data.shards={tmp_path / 'd'}", "data.name=../n", "init_from=stage:x",
                   "init_from=/abs/e", "nokey"]


def test_resolve_path_keeps_references():
    assert resolve_path("s3://bucket/x", "/base") == "s3://bucket/x"
    assert resolve_path("a/../b", "/base") == "/base/b"
    assert resolve_path("", "/base") == ""
