"""The background sender of an MLflow run: a queue of operations sent in order by one thread.

A step never waits on the network: `push` only appends to the queue. A transient failure puts
the batch back at the head of the queue and retries after a growing wait; a rejected request
(4xx) is dropped with a warning so it cannot block what follows.

The sender's state is two small enums instead of a handful of flags::

    Lifecycle  RUNNING --close()--> STOPPING --drained or timed out--> CLOSED
                  \\--the run cannot be opened--> DISABLED (queue cleared, pushes dropped)
    Activity   IDLE --batch taken--> SENDING --sent/dropped--> IDLE
                                         \\--transient failure--> BACKING_OFF --wait over,
                                              or flush() cuts it short--> IDLE

plus whether the server answered the last attempt (so "down" and "back" are logged once).

With a `SentLog`, the run id is written to the run folder as soon as the run exists, and each
acknowledged metrics batch moves the replay offset of `logs/metrics.jsonl` forward (see
`replay.py`); after the queue overflowed the offset stays where it was, so the next start
resends the lines the queue lost.
"""

from __future__ import annotations

import collections
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.tracking.base import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_OR_TAGS_PER_BATCH,
    TrackingConfig,
    import_mlflow,
    log,
    mlflow_client,
)
from pipeline.tracking.lineage import dataset_inputs
from pipeline.tracking.replay import SentLog, SentState


class Lifecycle(enum.Enum):
    RUNNING = "running"  # accepts operations
    STOPPING = "stopping"  # close() was called: no new operations, the queue drains
    CLOSED = "closed"  # the thread exits at its next look at the state
    DISABLED = "disabled"  # the run could not be opened: nothing is sent, pushes are dropped


class Activity(enum.Enum):
    IDLE = "idle"  # waiting for operations
    SENDING = "sending"  # a batch is out of the queue, on its way
    BACKING_OFF = "backing_off"  # the batch failed transiently and is back in the queue


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def is_transient(err: BaseException) -> bool:
    """Worth retrying: the server is down, overloaded or timed out (not a rejected request)."""
    status_code = getattr(err, "get_http_status_code", None)  # MlflowException and RestException
    if status_code is not None:
        code = status_code()
        return code >= 500 or code == 429
    if type(err).__name__ == "OperationalError":  # SQLite locked, or two processes migrating it
        return True
    root_module = type(err).__module__.split(".")[0]
    return isinstance(err, ConnectionError | TimeoutError) or root_module in ("requests", "urllib3")


@dataclass
class Op:
    """One queued operation."""

    kind: str  # open | metrics | params | tags | inputs | artifact | artifacts | terminate
    payload: Any = None
    offset: int | None = None  # metrics: byte offset in metrics.jsonl after their line


class RunSender:
    """Background thread owning the MLflow client; sends queued operations in order.

    `open_run(client) -> run_id` runs first, on the thread (creating or re-attaching the run).
    """

    def __init__(self, tracking_uri: str, cfg: TrackingConfig,
                 open_run: Callable[[Any], str], run_id: str | None,
                 sent_log: SentLog | None = None, sent_offset: int = 0):
        self.tracking_uri, self.cfg, self._open_run = tracking_uri, cfg, open_run
        self.run_id, self.dropped_metrics = run_id, 0
        self._sent_log, self._sent_offset = sent_log, sent_offset
        self._client = None
        self._ops: collections.deque[Op] = collections.deque([Op("open")])
        self._queued_metrics = 0
        self._cond = threading.Condition()
        self.lifecycle, self.activity = Lifecycle.RUNNING, Activity.IDLE
        self._reachable = True  # the last attempt reached the server
        self.opened = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    @property
    def queued_metrics(self) -> int:
        return self._queued_metrics

    def push(self, op: Op) -> None:
        """Queue `op` (dropped once the sender stops or is disabled)."""
        with self._cond:
            if self.lifecycle is not Lifecycle.RUNNING:
                return
            self._ops.append(op)
            if op.kind == "metrics":
                self._queued_metrics += len(op.payload)
                self._drop_oldest_metrics()
            self._cond.notify_all()

    def _drop_oldest_metrics(self) -> None:
        while self._queued_metrics > self.cfg.max_queued_metrics:
            index = next(i for i, op in enumerate(self._ops) if op.kind == "metrics")
            dropped = self._ops[index]
            del self._ops[index]
            self._queued_metrics -= len(dropped.payload)
            if self.dropped_metrics == 0:
                log.warning(
                    "tracking: more than %d metrics wait for MLflow; dropping the oldest "
                    "(they stay in logs/metrics.jsonl)", self.cfg.max_queued_metrics,
                )  # fmt: skip
            self.dropped_metrics += len(dropped.payload)

    def _drained(self) -> bool:
        return self.lifecycle is Lifecycle.DISABLED or (
            not self._ops and self.activity is Activity.IDLE)

    def flush(self, timeout_s: float | None) -> bool:
        """Wait until the queue is sent (a retry wait is cut short); False on timeout."""
        with self._cond:
            if self.activity is Activity.BACKING_OFF:
                self.activity = Activity.IDLE
            self._cond.notify_all()
            return self._cond.wait_for(self._drained, timeout_s)

    def close(self, timeout_s: float) -> bool:
        """Stop accepting work, send what is queued within timeout_s, then let the thread go."""
        with self._cond:
            if self.lifecycle is Lifecycle.RUNNING:
                self.lifecycle = Lifecycle.STOPPING
        drained = self.flush(timeout_s)
        with self._cond:
            self.lifecycle = Lifecycle.CLOSED
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        return drained

    def _loop(self) -> None:
        delay = self.cfg.retry_interval_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._ops or self.lifecycle is not Lifecycle.RUNNING)
                if self.lifecycle in (Lifecycle.CLOSED, Lifecycle.DISABLED) or not self._ops:
                    return
                batch = self._take_batch()
                self.activity = Activity.SENDING
            outcome = self._attempt(batch)
            with self._cond:
                self._settle(batch, outcome)
                if outcome == "retry":
                    self._back_off(delay)
            delay = (
                min(delay * 2, self.cfg.max_retry_interval_s)
                if outcome == "retry"
                else self.cfg.retry_interval_s
            )

    def _settle(self, batch: list[Op], outcome: str) -> None:
        """After an attempt (lock held): a batch to retry goes back to the head of the queue."""
        if outcome != "retry":
            self._record_sent(batch)
        if outcome == "retry":
            self._ops.extendleft(reversed(batch))
            self._queued_metrics += sum(len(op.payload) for op in batch if op.kind == "metrics")
            self.activity = Activity.BACKING_OFF
        else:
            self.activity = Activity.IDLE
        self._cond.notify_all()

    def _record_sent(self, batch: list[Op]) -> None:
        """Move the replay offset past the batch's lines (while no queued line was dropped)."""
        offsets = [op.offset for op in batch if op.offset is not None]
        if offsets and not self.dropped_metrics:
            self._sent_offset = max([self._sent_offset, *offsets])
            self._write_sent()

    def _write_sent(self) -> None:
        if self._sent_log is None or self.run_id is None:
            return
        try:
            self._sent_log.write(SentState(self.run_id, self._sent_offset))
        except OSError as err:  # the run folder's disk: worth a warning, not a stop
            log.warning("tracking: cannot write %s (%s)", self._sent_log.path, err)

    def _back_off(self, delay: float) -> None:
        """Wait before a retry (lock held); while stopping the wait is the short one."""
        wait_s = self.cfg.retry_interval_s if self.lifecycle is Lifecycle.STOPPING else delay
        self._cond.wait_for(
            lambda: self.activity is not Activity.BACKING_OFF
            or self.lifecycle is Lifecycle.CLOSED,
            wait_s,
        )
        if self.activity is Activity.BACKING_OFF:
            self.activity = Activity.IDLE

    def _take_batch(self) -> list[Op]:
        """The head operation; consecutive metric operations are merged into one log_batch."""
        batch = [self._ops.popleft()]
        if batch[0].kind == "metrics":
            count = len(batch[0].payload)
            while self._ops and self._ops[0].kind == "metrics":
                if count + len(self._ops[0].payload) > MAX_METRICS_PER_BATCH:
                    break
                count += len(self._ops[0].payload)
                batch.append(self._ops.popleft())
            self._queued_metrics -= count
        return batch

    def _attempt(self, batch: list[Op]) -> str:
        try:
            self._send(batch)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            if is_transient(err):
                if self._reachable:
                    log.warning(
                        "tracking: cannot reach MLflow at %s (%s); training goes on, metrics are "
                        "queued and kept in logs/metrics.jsonl", self.tracking_uri, err,
                    )  # fmt: skip
                self._reachable = False
                return "retry"
            self._reject(batch, err)
            return "drop"
        if not self._reachable:
            log.warning(
                "tracking: MLflow at %s is reachable again; sending the queue", self.tracking_uri
            )
            self._reachable = True
        return "sent"

    def _reject(self, batch: list[Op], err: Exception) -> None:
        if batch[0].kind != "open":
            log.warning("tracking: MLflow rejected %s (%s); dropped", batch[0].kind, err)
            return
        log.warning(
            "tracking: cannot open an MLflow run at %s (%s); tracking is off",
            self.tracking_uri,
            err,
        )
        with self._cond:
            self.lifecycle = Lifecycle.DISABLED
            self._ops.clear()
            self._queued_metrics = 0
            self._cond.notify_all()

    def _send(self, batch: list[Op]) -> None:
        mlflow = import_mlflow(self.cfg)
        entities = mlflow.entities
        kind, payload = batch[0].kind, batch[0].payload
        if kind == "open":
            if self._client is None:
                self._client = mlflow_client(self.tracking_uri, self.cfg)
            self.run_id = self._open_run(self._client)
            self._write_sent()  # recorded before anyone is told the run exists
            self.opened.set()
        elif kind == "metrics":
            metrics = [entities.Metric(*m) for op in batch for m in op.payload]
            for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)
        elif kind == "inputs":
            self._client.log_inputs(self.run_id, datasets=dataset_inputs(entities, payload))
        elif kind in ("params", "tags"):
            make = entities.Param if kind == "params" else entities.RunTag
            for chunk in _chunks([make(k, v) for k, v in payload], MAX_PARAMS_OR_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, **{kind: chunk}, synchronous=True)
        elif kind == "artifact":
            self._client.log_artifact(self.run_id, *payload)
        elif kind == "artifacts":
            self._client.log_artifacts(self.run_id, *payload)
        elif kind == "terminate":
            self._client.set_terminated(self.run_id, status=payload)

