"""Every shipped recipe, pipeline and cluster file validates against its schema: a typo or an
inconsistent combination fails here, not an hour into a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.executors import load_cluster_config
from launch.graph import load_pipeline
from stages import load_stage_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("recipe", sorted((CONFIGS / "stages").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_stage_recipe_validates(recipe):
    kind, cfg = load_stage_config(recipe)
    assert kind == recipe.parent.name
    assert cfg.train.max_steps >= 1


@pytest.mark.parametrize("pipeline", sorted((CONFIGS / "pipelines").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_pipeline_validates(pipeline):
    loaded = load_pipeline(pipeline)
    names = [s.name for s in loaded.stages]
    assert len(names) == len(set(names))
    for index, spec in enumerate(loaded.stages):  # inputs come from earlier stages only
        assert set(spec.depends_on) <= set(names[:index])


@pytest.mark.parametrize("cluster", sorted((CONFIGS / "clusters").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_cluster_file_validates(cluster):
    assert load_cluster_config(cluster).time_min >= 1
