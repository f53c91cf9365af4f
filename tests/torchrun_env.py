"""The environment of a test's `torchrun` launch: one thread per rank, no telemetry or hub
access, the repository importable, and no rank variables inherited from the test process."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def torchrun_env(**extra: str) -> dict[str, str]:
    """os.environ for a torchrun child, plus ``extra`` variables."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env
