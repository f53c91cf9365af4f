"""Stage kinds: each module has a ``Config`` dataclass and ``run(cfg, ctx) -> StageResult``.

A recipe names its kind with a top-level ``stage:`` key. The table below is explicit (no string
registry that depends on import side effects): adding a stage kind means adding a line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

STAGE_MODULES = {
    "backbone_pretrain": "stages.backbone_pretrain",
    "detr_pretrain": "stages.detr_pretrain",
    "domain_finetune": "stages.domain_finetune",
    "segment_finetune": "stages.segment_finetune",
}


def stage_module(kind: str):
    """The module of a stage kind; a clear error for an unknown one."""
    from pipeline.config import ConfigError

    if kind not in STAGE_MODULES:
        import difflib

        close = difflib.get_close_matches(kind, list(STAGE_MODULES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown stage kind '{kind}'{hint} (known: {', '.join(STAGE_MODULES)})")
    return importlib.import_module(STAGE_MODULES[kind])


def recipe_kind(path: str | Path) -> str:
    """The ``stage:`` key of a recipe (looked up through its ``base:`` chain)."""
    from pipeline.config import ConfigError, read_recipe

    data, _ = read_recipe(path)
    kind = data.get("stage")
    if not kind:
        raise ConfigError(f"{path}: a stage recipe needs a top-level 'stage:' key naming its kind "
                          f"({', '.join(STAGE_MODULES)})")
    return kind


def load_stage_config(path: str | Path, overrides: list[str] | None = None) -> tuple[str, Any]:
    """(kind, validated Config) of a stage recipe with dotted overrides applied."""
    from pipeline.config import load_config

    kind = recipe_kind(path)
    return kind, load_config(path, stage_module(kind).Config, overrides, ignore_keys=("stage",))
