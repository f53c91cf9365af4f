"""What of `logs/metrics.jsonl` MLflow has acknowledged, so a restart sends the rest.

`logs/metrics.sent` holds `{"run_id": ..., "offset": N}`: the MLflow run the stage logs to
(written as soon as the run exists, so a resume re-attaches even when the run was created late)
and the byte offset in metrics.jsonl up to which every line was sent. A process killed during an
MLflow outage loses its in-memory queue; the next start re-attaches to the run and replays the
lines after the offset. Replayed lines keep their original timestamps, so a line sent twice (the
kill came between MLflow's answer and the offset's write) is the same metric and MLflow stores it
once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import write_json_atomic
from pipeline.run_folder import RunFolder
from pipeline.tracking.base import (
    MAX_METRICS_PER_BATCH,
    clean_key,
    import_mlflow,
    log,
    mlflow_client,
)


@dataclass(frozen=True)
class SentState:
    run_id: str | None = None  # the MLflow run the metrics go to
    offset: int = 0  # bytes of metrics.jsonl that MLflow acknowledged


@dataclass(frozen=True)
class MetricsLine:
    """One metrics.jsonl line: the metrics of one step, ready for MLflow."""

    end_offset: int  # byte offset just after the line
    step: int
    time_ms: int
    metrics: dict[str, float]


class SentLog:
    """Reads and atomically rewrites `logs/metrics.sent` (the sender thread is the only writer)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def read(self) -> SentState:
        """The stored state; a missing or unreadable file counts as nothing sent."""
        try:
            data = json.loads(self.path.read_text())
            return SentState(data.get("run_id"), int(data.get("offset", 0)))
        except FileNotFoundError:
            return SentState()
        except (OSError, ValueError, TypeError, AttributeError) as err:
            log.warning("tracking: %s is unreadable (%s); replaying from the start", self.path, err)
            return SentState()

    def write(self, state: SentState) -> None:
        """Replace the file atomically (fsynced: it must survive the kill it exists for)."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"run_id": state.run_id, "offset": state.offset},
                              indent=None)


def file_size(path: str | Path) -> int:
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        return 0


def unsent_lines(metrics_path: str | Path, offset: int) -> Iterator[MetricsLine]:
    """The complete lines of metrics.jsonl after byte `offset` (a torn last line is skipped)."""
    path = Path(metrics_path)
    if not path.is_file():
        return
    with path.open("rb") as handle:
        handle.seek(offset)
        position = offset
        for raw in handle:
            position += len(raw)
            if not raw.endswith(b"\n"):
                return  # the writer was killed mid-line; the line is incomplete
            try:
                record = json.loads(raw)
                values = {k: float(v) for k, v in record["metrics"].items()}
                yield MetricsLine(position, int(record["step"]),
                                  int(float(record["time"]) * 1000), values)
            except (ValueError, KeyError, TypeError) as err:
                log.warning("tracking: skipping a bad line of %s (%s)", path, err)


def metric_items(line: MetricsLine) -> list[tuple[str, float, int, int]]:
    """A line's metrics as (key, value, timestamp ms, step): what a replay sends to MLflow."""
    return [(clean_key(k), v, line.time_ms, line.step) for k, v in line.metrics.items()]


def send_unsent(run_folder: str | Path, run_id: str, tracking_uri: str) -> int:
    """Send now, batch by batch, the lines of a run folder's metrics.jsonl that MLflow has not
    acknowledged (a stage that finished, or was killed, during an outage), moving the replay
    offset after each batch. Only when `logs/metrics.sent` names `run_id`: its offset counts
    that run's lines. Returns the lines sent; MLflow's errors propagate."""
    folder = RunFolder(run_folder)
    sent_log = SentLog(folder.metrics_sent_path)
    state = sent_log.read()
    if state.run_id != run_id:
        return 0
    client = mlflow_client(tracking_uri)
    metric = import_mlflow().entities.Metric
    batch: list = []
    count = offset = 0
    for line in unsent_lines(folder.metrics_path, state.offset):
        items = metric_items(line)
        if batch and len(batch) + len(items) > MAX_METRICS_PER_BATCH:
            client.log_batch(run_id, metrics=batch, synchronous=True)
            sent_log.write(SentState(run_id, offset))
            batch = []
        batch.extend(metric(*item) for item in items)
        offset, count = line.end_offset, count + 1
    if batch:
        client.log_batch(run_id, metrics=batch, synchronous=True)
        sent_log.write(SentState(run_id, offset))
    if count:
        log.warning("tracking: sent %d lines of %s that MLflow had not received", count,
                    folder.metrics_path)
    return count
