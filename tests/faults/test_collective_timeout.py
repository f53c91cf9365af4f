"""A rank that dies or freezes makes the others fail within the collective timeout, not hang.

Two real processes in a gloo group (``collective_worker.py``); rank 1 is SIGKILLed (its sockets
close) or SIGSTOPped (its sockets stay open, so only the timeout can end rank 0's wait).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.dist import COLLECTIVE_TIMEOUT_ENV, DistEnvError, collective_timeout_s

WORKER = Path(__file__).with_name("collective_worker.py")
pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_ranks(tmp_path: Path, timeout_s: float) -> list[subprocess.Popen]:
    env = {**os.environ, COLLECTIVE_TIMEOUT_ENV: str(timeout_s), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(port),
                              str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
            for rank in range(2)]


def _wait_ready(tmp_path: Path, ranks: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
        assert all(p.poll() is None for p in ranks), [p.stderr.read() for p in ranks if p.poll()]
        assert time.monotonic() < deadline, "the ranks never finished their first all-reduce"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_surviving_rank_exits_nonzero_within_the_timeout(tmp_path, fault):
    timeout_s = 20.0 if fault == signal.SIGKILL else 5.0
    ranks = _start_ranks(tmp_path, timeout_s)
    try:
        _wait_ready(tmp_path, ranks)
        os.kill(ranks[1].pid, fault)
        started = time.monotonic()
        (tmp_path / "go").write_text("")
        try:
            code = ranks[0].wait(timeout=timeout_s + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waits {timeout_s + 20:.0f} s after its peer was stopped")
        took = time.monotonic() - started
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    error = ranks[0].stderr.read()
    assert code != 0, error
    assert took < timeout_s + 15, took
    if fault == signal.SIGSTOP:  # nothing but the timeout can have ended the wait
        assert took >= timeout_s * 0.8, (took, error[-2000:])


def test_timeout_setting_is_read_and_checked():
    assert collective_timeout_s({}) == 600.0
    assert collective_timeout_s({COLLECTIVE_TIMEOUT_ENV: "20"}) == 20.0
    for bad in ("0", "-3", "nan", "inf", "ten"):
        with pytest.raises(DistEnvError, match=COLLECTIVE_TIMEOUT_ENV):
            collective_timeout_s({COLLECTIVE_TIMEOUT_ENV: bad})
