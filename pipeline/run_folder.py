"""The run folder of one stage: the only place that names its files.

::

    config.yaml            the resolved config, its hash and derived values
    checkpoints/step_<N>/  strategy shards + client state; COMPLETE marks a finished save
    checkpoints/diverged_step_<N>/   the non-finite guard's save: never `latest`, never pruned
    checkpoints/unloadable_step_<N>/ a complete checkpoint that failed to load, moved aside
    latest                 names the newest complete checkpoint folder (written last)
    export/                model.safetensors + meta.json (consolidated fp32 weights)
    DONE.json              final metrics, tracker run id, registered model version
    STOP_REQUESTED         a stop request (preemption) of a running job
    world_changes.json     each elastic resume: step, old and new world size, global batch, lr
    logs/metrics.jsonl     every logged metric (kept also when the tracker is down)
    logs/metrics.sent      the tracker's run id and the byte offset of metrics.jsonl it has sent
    logs/torchrun/         torch.distributed.run's per-rank error files (local multi-process runs)
    artifacts/             what the evaluation draws (prediction pictures), logged to the tracker

Other modules ask a `RunFolder` for these paths (or use the constants below for an export folder
that lives elsewhere) instead of spelling the names themselves.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
EXPORT_DIR = "export"
DONE_FILE = "DONE.json"
STOP_FILE = "STOP_REQUESTED"
WORLD_CHANGES_FILE = "world_changes.json"  # train.elastic_resume's record of each change
LOGS_DIR = "logs"
METRICS_FILE = "metrics.jsonl"
METRICS_SENT_FILE = "metrics.sent"  # {"run_id", "offset"}: what MLflow acknowledged
ARTIFACTS_DIR = "artifacts"  # what a stage's evaluation draws (prediction pictures)
EVALUATIONS_DIR = "evaluations"
# An export folder (inside a run folder, or downloaded from the registry).
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
COMPLETE_MARKER = "COMPLETE"

STEP_DIR = re.compile(r"^step_(\d+)$")
DIVERGED_PREFIX = "diverged_"  # + step_<N>: weights saved when training diverged
UNLOADABLE_PREFIX = "unloadable_"  # + step_<N>: kept for inspection, never resumed from


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed (also: `latest` names no complete folder)."""


class RunFolder:
    """Paths of one stage run (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def latest_path(self) -> Path:
        return self.root / LATEST_FILE

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT_DIR

    @property
    def export_weights_path(self) -> Path:
        return self.export_dir / WEIGHTS_FILE

    @property
    def export_meta_path(self) -> Path:
        return self.export_dir / META_FILE

    @property
    def done_path(self) -> Path:
        return self.root / DONE_FILE

    @property
    def stop_path(self) -> Path:
        return self.root / STOP_FILE

    @property
    def world_changes_path(self) -> Path:
        return self.root / WORLD_CHANGES_FILE

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def torchrun_logs_dir(self) -> Path:
        return self.logs_dir / "torchrun"

    @property
    def metrics_path(self) -> Path:
        return self.logs_dir / METRICS_FILE

    @property
    def metrics_sent_path(self) -> Path:
        return self.logs_dir / METRICS_SENT_FILE

    @property
    def artifacts_dir(self) -> Path:
        return self.root / ARTIFACTS_DIR

    @property
    def evaluations_dir(self) -> Path:
        """Copies of the pictures and reports of every evaluation, one folder per step."""
        return self.artifacts_dir / EVALUATIONS_DIR

    def evaluation_dir(self, step: int) -> Path:
        return self.evaluations_dir / f"step_{step:06d}"

    def create(self) -> RunFolder:
        """Make the folders (idempotent)."""
        for folder in (self.checkpoints_dir, self.export_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def step_dir(self, step: int) -> Path:
        """checkpoints/step_<step>/"""
        return self.checkpoints_dir / f"step_{step}"

    def latest_name(self) -> str | None:
        """What `latest` says (e.g. "step_12"), unchecked; None without `latest`."""
        return self.latest_path.read_text().strip() if self.latest_path.is_file() else None

    def latest_dir(self) -> Path | None:
        """The complete folder `latest` names; None without `latest` or when it names no
        complete step folder (resume then falls back to the newest complete one)."""
        name = self.latest_name()
        if name is None or not STEP_DIR.match(name):
            return None
        directory = self.checkpoints_dir / name
        return directory if is_complete(directory) else None

    def latest_step(self) -> int | None:
        """Step of the latest checkpoint, or None."""
        directory = self.latest_dir()
        return None if directory is None else step_of(directory)

    def step_dirs(self) -> list[Path]:
        """checkpoints/step_*/ folders, oldest first (complete or not)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=step_of)

    def complete_step_dirs(self) -> list[Path]:
        """The step folders whose save finished (COMPLETE marker), oldest first."""
        return [p for p in self.step_dirs() if is_complete(p)]

    def diverged_dir(self, step: int) -> Path:
        """checkpoints/diverged_step_<step>/: outside `step_dirs`, so never resumed or pruned."""
        return self.checkpoints_dir / f"{DIVERGED_PREFIX}step_{step}"

    def unloadable_dir(self, directory: Path) -> Path:
        """Where a complete step folder that failed to load is moved (kept, never resumed)."""
        return self.checkpoints_dir / f"{UNLOADABLE_PREFIX}{Path(directory).name}"


def is_complete(directory: Path) -> bool:
    """Whether a checkpoint folder's save finished (its COMPLETE marker exists)."""
    return (Path(directory) / COMPLETE_MARKER).is_file()


def step_of(directory: Path) -> int:
    """N of a checkpoints/step_<N>/ folder (also of diverged_/unloadable_step_<N>)."""
    name = Path(directory).name
    for prefix in (DIVERGED_PREFIX, UNLOADABLE_PREFIX):
        name = name.removeprefix(prefix)
    return int(STEP_DIR.match(name).group(1))
