"""The MLflow sender's state machine: down -> retry -> back, a run that cannot be opened, close."""

from __future__ import annotations

import logging

from pipeline.tracking import TrackingConfig
from pipeline.tracking.sender import Activity, Lifecycle, Op, RunSender

CFG = TrackingConfig(retry_interval_s=0.05, max_retry_interval_s=0.1, finish_timeout_s=5)


def test_a_server_down_twice_is_retried_then_the_run_opens(tmp_path, caplog):
    calls = []

    def open_run(client):
        calls.append(client)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "run-1"

    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        sender = RunSender(f"sqlite:///{tmp_path}/m.db", CFG, open_run, run_id=None)
        assert sender.opened.wait(60)  # the first mlflow import is slow
        assert sender.flush(60)
    assert sender.run_id == "run-1" and len(calls) == 3
    assert (sender.lifecycle, sender.activity) == (Lifecycle.RUNNING, Activity.IDLE)
    assert caplog.text.count("cannot reach MLflow") == 1  # once, not per retry
    assert "reachable again" in caplog.text
    assert sender.close(1) and sender.lifecycle is Lifecycle.CLOSED
    sender.push(Op("tags", [("a", "b")]))  # after close: dropped, not queued
    assert sender.queued_metrics == 0 and sender.flush(0.1)


def test_a_run_that_cannot_be_opened_disables_the_sender(tmp_path, caplog):
    def open_run(client):
        raise ValueError("bad experiment")  # not transient: no retry

    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        sender = RunSender(f"sqlite:///{tmp_path}/m.db", CFG, open_run, run_id=None)
        assert sender.flush(60)
    assert sender.lifecycle is Lifecycle.DISABLED and "tracking is off" in caplog.text
    sender.push(Op("metrics", [("loss", 1.0, 0, 1)]))
    assert sender.queued_metrics == 0
    assert sender.close(1)


def test_close_while_backing_off_gives_up_within_its_timeout(tmp_path):
    def open_run(client):
        raise ConnectionError("refused")

    sender = RunSender(f"sqlite:///{tmp_path}/m.db", CFG, open_run, run_id=None)
    sender.push(Op("metrics", [("loss", 1.0, 0, 1)]))
    assert sender.close(0.3) is False  # never reached: not drained, but closed
    assert sender.lifecycle is Lifecycle.CLOSED and sender.queued_metrics >= 1
