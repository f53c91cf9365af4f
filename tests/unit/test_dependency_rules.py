"""DESIGN.md's dependency rules, checked in clean interpreters through sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def modules_after_import(modules: list[str]) -> set[str]:
    imports = "; ".join(f"import {m}" for m in modules)
    code = f"import json, sys; {imports}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


# Modules that need an optional GPU-only package, imported only when that path is chosen.
OPTIONAL_DEPENDENCY = {"pipeline.models.ops.ms_deform_attn_triton": "triton"}


def available(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def pipeline_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        if name in OPTIONAL_DEPENDENCY and not available(OPTIONAL_DEPENDENCY[name]):
            continue
        names.append(name)
    return names


def top_packages(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


def test_library_never_imports_the_layers_above():
    """Importing every library module together loads none of these, so no single one does."""
    loaded = top_packages(modules_after_import(pipeline_modules()))
    assert not loaded & {"stages", "launch", "configs", "submitit"}
    # deepspeed and mlflow are imported lazily, inside the one module that uses each.
    assert "deepspeed" not in loaded, "a pipeline module imports deepspeed at import time"
    assert "mlflow" not in loaded, "a pipeline module imports mlflow at import time"


def test_the_check_can_fail():
    """The same probe sees a layer above when it is imported (guards against a vacuous test)."""
    assert "launch" in top_packages(modules_after_import(["launch.cli"]))


def test_engine_knows_nothing_of_models_data_losses():
    engine = [m for m in pipeline_modules() if m.startswith("pipeline.engine")]
    if not engine:
        pytest.skip("pipeline.engine not present")
    loaded = modules_after_import(engine)
    bad = {m for m in loaded if m.startswith(("pipeline.models", "pipeline.data",
                                               "pipeline.losses"))}
    assert not bad, f"the engine imports {sorted(bad)}"


def test_only_launch_imports_submitit():
    offenders = []
    for path in list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "stages").rglob("*.py")):
        text = path.read_text()
        if "import submitit" in text or "from submitit" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders

