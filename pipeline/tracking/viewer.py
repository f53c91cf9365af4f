"""`detrforge ui`: a light local MLflow viewer over a workdir's store.

One uvicorn worker and no background job runner or periodic tasks (`UI_ENV`): those serve GenAI
evaluation jobs and a shared team server, not a person looking at their training runs. The
viewer runs in its own process group so that stopping it stops its worker too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from pipeline.tracking.base import (
    EXPERIMENT_KIND_TAG,
    UI_ENV,
    TrackingError,
    embedded_tracking_uri,
    mlflow_client,
    ui_command,
)

# MLflow 3's UI opens in its GenAI mode unless the page's URL (or the choice a browser stored
# earlier) says otherwise; this query parameter opens the model-training view.
TRAINING_VIEW = "workflowType=machine_learning"


class Viewer:
    """A started `mlflow server` process; `wait_ready` polls its /health endpoint."""

    def __init__(self, workdir: str | Path, host: str = "127.0.0.1", port: int = 5000,
                 log_path: str | Path | None = None):
        self.url = f"http://{host}:{int(port)}"
        env = {**os.environ, **UI_ENV}
        env.pop("MLFLOW_TRACKING_URI", None)  # the viewer serves the workdir's store
        out = Path(log_path).open("ab") if log_path else None
        self.started = time.monotonic()
        self.process = subprocess.Popen(ui_command(workdir, host, port), env=env, stdout=out,
                                        stderr=out, start_new_session=True)

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Seconds from start until /health answered; TrackingError if it exits or times out."""
        deadline = self.started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TrackingError(f"pipeline/tracking: the MLflow viewer exited with code "
                                    f"{self.process.returncode}; is port {self.url} taken?")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TrackingError(f"pipeline/tracking: the MLflow viewer at {self.url} did not answer "
                            f"within {timeout_s:.0f} s")

    def training_links(self, workdir: str | Path) -> list[tuple[str, str]]:
        """(experiment name, URL of its runs in the model-training view) for each detrforge
        experiment in the workdir's store; [] before the first stage ran."""
        if not (Path(workdir) / "mlflow.db").is_file():
            return []
        client = mlflow_client(embedded_tracking_uri(workdir))
        return [(e.name, f"{self.url}/#/experiments/{e.experiment_id}/runs?{TRAINING_VIEW}")
                for e in client.search_experiments()
                if e.tags.get(EXPERIMENT_KIND_TAG) == "custom_model_development"]

    def stop(self) -> None:
        """Stop the server and its worker (the whole process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def rss_mib(self) -> float:
        """Resident memory of the server and its children, in MiB (Linux /proc)."""
        total = 0
        for pid in _group_pids(self.process.pid):
            try:
                fields = Path(f"/proc/{pid}/statm").read_text().split()
                total += int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
        return total / 2**20


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
