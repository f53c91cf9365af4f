"""Lineage as MLflow records it: the shard sets a stage read (dataset inputs), the parent
stage's registered version, and the sentences that describe a run and a model version."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.run_folder import RunFolder

DATASET_CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT
PARENT_MODEL_TAG = "detrforge.parent_model"  # "<name>/<version>" of each parent, comma-separated


@dataclass(frozen=True)
class DatasetRecord:
    """One shard set a stage read, as an MLflow dataset input."""

    name: str  # "<data folder>/<split>", e.g. "detect/train"
    digest: str  # the set's fingerprint: sha256 of its shard bytes (else of its _info.json)
    source: str  # absolute path of the split folder
    num_samples: int  # samples over all shards of the split
    split: str  # "train", "val": MLflow's dataset context


def shard_datasets(shards_root: str | Path) -> list[DatasetRecord]:
    """A record per `<split>/_info.json` under shards_root (none when it holds no shard set)."""
    from pipeline.data.shards import load_shard_info

    records = []
    for info_path in sorted(Path(shards_root).glob("*/_info.json")):
        info = load_shard_info(info_path.parent)
        digest = info.content_sha256 or hashlib.sha256(info_path.read_bytes()).hexdigest()
        records.append(DatasetRecord(
            name=f"{Path(shards_root).name}/{info_path.parent.name}", digest=digest[:16],
            source=str(info_path.parent.resolve()), num_samples=int(sum(info.counts)),
            split=info.split or info_path.parent.name))
    return records


def dataset_inputs(entities, records: list[DatasetRecord]) -> list:
    """`mlflow.entities.DatasetInput`s of the records (entities: the `mlflow.entities` module)."""
    return [
        entities.DatasetInput(
            entities.Dataset(
                name=r.name, digest=r.digest, source_type="local",
                source=json.dumps({"uri": r.source}),
                profile=json.dumps({"num_samples": r.num_samples}),
            ),
            tags=[entities.InputTag(DATASET_CONTEXT_TAG, r.split)],
        )
        for r in records
    ]  # fmt: skip


def parent_models(workdir: str | Path, pipeline: str, inputs: Mapping[str, str] | None,
                  stage_prefix: str = "stage:", model_prefix: str = "models:/") -> list[str]:
    """The registered versions a stage started from: `<pipeline>.<parent>/<version>` read from
    each parent stage's DONE.json, and `models:/...` inputs as written."""
    parents = []
    for key in inputs or {}:
        if key.startswith(model_prefix):
            parents.append(key[len(model_prefix):])
        elif key.startswith(stage_prefix):
            name = key[len(stage_prefix):]
            done = _done_record(Path(workdir) / pipeline / name)
            version = done.get("model_version")
            parents.append(f"{pipeline}.{name}/{version}" if version else f"{pipeline}.{name}")
    return parents


def _done_record(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads(RunFolder(run_dir).done_path.read_text())
    except (OSError, ValueError):
        return {}


def run_description(stage: str, kind: str, pipeline: str, max_steps: int,
                    datasets: list[DatasetRecord], parents: list[str], start: str) -> str:
    """One sentence: what the stage did."""
    data = ", ".join(f"{d.name} ({d.num_samples} samples)" for d in datasets) or "its data"
    origin = f", starting from {', '.join(parents)}" if parents else ""
    resumed = " (resumed from its checkpoint)" if start == "resume" else ""
    return (f"Stage `{stage}` of pipeline `{pipeline}`: {kind.replace('_', ' ')} for "
            f"{max_steps} steps on {data}{origin}{resumed}.")


def version_description(stage: str, pipeline: str, datasets: list[DatasetRecord],
                        main_metric: str, metrics: Mapping[str, float], config_hash: str,
                        parents: list[str]) -> str:
    """What a registered version is: stage, data, main metric, config hash, parent."""
    value = metrics.get(main_metric)
    score = f"{main_metric} {value:.4f}" if isinstance(value, int | float) else "no main metric"
    data = ", ".join(f"{d.name} @ {d.digest}" for d in datasets) or "unknown data"
    parent = ", ".join(parents) or "none (trained from scratch or ImageNet weights)"
    return (f"Export of stage `{stage}` (pipeline `{pipeline}`). {score}. Data: {data}. "
            f"Config hash {config_hash}. Parent model: {parent}.")
