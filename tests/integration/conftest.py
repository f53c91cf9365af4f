"""A real `mlflow server` on 127.0.0.1: for the tracking tests (SQLite store, artifacts served by
the server) and for the SLURM tests (a database store in the local cluster's MariaDB, artifacts
written by the jobs to a shared folder, as on a real cluster)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` in its own process group; `kill()` then `start()` reuses port and store."""

    def __init__(self, folder: Path, backend_store_uri: str | None = None):
        self.folder = folder
        self.backend_store_uri = backend_store_uri
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        if self.backend_store_uri is None:
            store = ["--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                     "--artifacts-destination", (self.folder / "artifacts").as_uri()]
        else:
            store = ["--backend-store-uri", self.backend_store_uri,
                     "--default-artifact-root", (self.folder / "artifacts").as_uri()]
        argv = [
            sys.executable, "-m", "mlflow", "server", *store,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        # No background job runner (seven huey consumers): it only slows the start down.
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        log = (self.folder / "server.log").open("ab")
        # Own process group: the server starts worker processes that must die with it.
        self.process = subprocess.Popen(
            argv, stdout=log, stderr=log, env=env, start_new_session=True
        )
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"mlflow server not ready after {timeout_s} s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole server, as a crash or a lost node would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A running `mlflow server`; tests may kill and restart it (same port, same store)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.kill()


REPO = Path(__file__).resolve().parents[2]
MLFLOW_TEST_DATABASE = "mlflow_tests"


def cluster_mlflow_uri(database: str = MLFLOW_TEST_DATABASE) -> str:
    """The SQLAlchemy URI of ``database`` in the local cluster's MariaDB (cluster.sh knows the
    port and the user)."""
    return subprocess.run([str(REPO / "launch" / "slurm" / "cluster.sh"), "mlflow-uri", database],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def recreate_database(uri: str) -> None:
    """An empty database at ``uri`` (mysql+pymysql://user:password@host:port/name)."""
    import pymysql
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    connection = pymysql.connect(host=url.host, port=url.port, user=url.username,
                                 password=url.password, connect_timeout=5)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
            cursor.execute(f"CREATE DATABASE `{url.database}` CHARACTER SET utf8mb4")
    finally:
        connection.close()


@pytest.fixture(scope="session")
def cluster_mlflow_server(tmp_path_factory):
    """`mlflow server` whose backend store is a fresh database in the local SLURM cluster's
    MariaDB (the one slurmdbd uses); skipped when that MariaDB is not up."""
    import pymysql

    uri = cluster_mlflow_uri()
    try:
        recreate_database(uri)
    except pymysql.MySQLError as err:
        pytest.skip(f"the local cluster's MariaDB is not reachable ({err}); run "
                    "launch/slurm/cluster.sh up")
    server = MlflowServer(tmp_path_factory.mktemp("cluster_mlflow"), backend_store_uri=uri)
    server.start()
    yield server
    server.kill()
