"""One holder per pipeline and per run folder: a second `detrforge run` (or `--force`) gets one
line naming the holder and touches nothing; a stale lock is taken over with a warning."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.locks import FolderLock, LockHeldError, lock_path
from tests.faults.conftest import ROOT, assert_one_line_error, detrforge, lock_holder

pytestmark = pytest.mark.timeout(300)


def test_second_run_of_a_pipeline_gets_one_line_naming_the_holder(finished_pipeline):
    pipe, workdir = finished_pipeline
    with lock_holder(workdir / "pipe", "detrforge run") as holder:
        done = detrforge("run", pipe, "--workdir", workdir)
        line = assert_one_line_error(done, "detrforge run", f"pid {holder.pid}",
                                     socket.gethostname(), str(lock_path(workdir / "pipe")))
        assert "wait for it to finish" in line and f"kill {holder.pid}" in line
        assert lock_path(workdir / "pipe").is_file()  # the holder's lock is left alone
    assert not (workdir / "pipe" / "summary.md").exists()  # the second run did nothing


def test_force_does_not_archive_a_run_folder_in_use(finished_pipeline):
    pipe, workdir = finished_pipeline
    run_dir = workdir / "pipe" / "backbone"
    with lock_holder(run_dir, "stage backbone") as holder:
        done = detrforge("run", pipe, "--workdir", workdir, "--force")
        assert_one_line_error(done, str(run_dir), "stage backbone", f"pid {holder.pid}")
    assert (run_dir / "DONE.json").is_file() and not (workdir / "pipe" / ".archive").exists()
    assert not lock_path(workdir / "pipe").exists()  # the refused run released its own lock


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(finished_pipeline):
    pipe, workdir = finished_pipeline
    with lock_holder(workdir / "pipe", "detrforge run") as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(workdir / "pipe").is_file()  # a kill -9 leaves its lock behind
    done = detrforge("run", pipe, "--workdir", workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "taking over the stale lock" in done.stderr
    assert f"its process {holder.pid} on this host is gone" in done.stderr
    assert "skipped (up to date)" in done.stdout
    assert not lock_path(workdir / "pipe").exists()  # released at the end


def test_stage_process_refuses_a_run_folder_held_by_another(finished_pipeline):
    from launch.graph import load_pipeline
    from launch.stage_main import stage_spec

    pipe, workdir = finished_pipeline
    pipeline = load_pipeline(pipe)
    spec_file = workdir / "spec.json"
    spec_file.write_text(json.dumps(stage_spec(pipeline, pipeline.stage("backbone"), workdir,
                                               None)))
    run_dir = workdir / "pipe" / "backbone"
    with lock_holder(run_dir, "stage backbone", env={"SLURM_JOB_ID": "4242"}) as holder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["PATH"] = os.path.dirname(sys.executable)  # no squeue: the job's state is unknown
        done = subprocess.run([sys.executable, "-m", "launch.stage_main", str(spec_file)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 2, done.stderr[-2000:]
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("detrforge: stage backbone failed:") and "in use by" in line
        assert "SLURM job 4242" in line and f"pid {holder.pid}" in line and "scancel 4242" in line
    assert (run_dir / "DONE.json").is_file()


TAKER = """
import sys, time
from pathlib import Path
from pipeline.locks import FolderLock, LockHeldError
folder, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
try:
    FolderLock(folder, "taker").acquire()
    print("won", flush=True)
    time.sleep(3)
except LockHeldError:
    print("refused", flush=True)
"""


def _stale_holder_file(folder: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(folder).write_text(json.dumps({
        "host": socket.gethostname(), "pid": dead.pid, "job_id": None, "started": time.time(),
        "purpose": "detrforge run", "token": "dead", "pid_start": None}))


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_exactly_one_of_concurrent_takers_wins(tmp_path, stale):
    folder = tmp_path / "pipe"
    if stale:
        _stale_holder_file(folder)
    go = tmp_path / "go"
    takers = [subprocess.Popen([sys.executable, "-c", TAKER, str(folder), str(go)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    time.sleep(1.0)
    go.write_text("")
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in takers)
    assert outcomes == ["refused", "refused", "refused", "won"], outcomes


def _holder_file(folder: Path, **fields) -> None:
    lock_path(folder).parent.mkdir(parents=True, exist_ok=True)
    holder = {"host": "node-17", "pid": 4321, "job_id": None, "started": time.time(),
              "purpose": "stage detr", "token": "t", "pid_start": None, **fields}
    lock_path(folder).write_text(json.dumps(holder))


@pytest.mark.parametrize(("job_state", "taken"), [(True, False), (None, False), (False, True)],
                         ids=["job-running", "job-state-unknown", "job-over"])
def test_lock_of_a_slurm_job_on_another_node(tmp_path, job_state, taken):
    folder = tmp_path / "pipe" / "detr"
    _holder_file(folder, job_id="77")
    asked = []
    lock = FolderLock(folder, "detrforge run", job_alive=lambda job: asked.append(job) or job_state)
    if taken:
        with lock:
            assert json.loads(lock_path(folder).read_text())["pid"] == os.getpid()
        assert not lock_path(folder).exists()
    else:
        with pytest.raises(LockHeldError, match=r"SLURM job 77, pid 4321 on node-17.*scancel 77"):
            lock.acquire()
    assert asked == ["77"]


def test_requeued_job_takes_over_its_own_earlier_lock(tmp_path):
    folder = tmp_path / "pipe" / "detr"
    _holder_file(folder, job_id="77")
    with FolderLock(folder, "stage detr", job_alive=lambda job: True, job_id="77") as lock:
        assert lock.holder is not None and lock.holder.job_id == "77"


def test_release_never_removes_another_holders_lock(tmp_path):
    folder = tmp_path / "pipe"
    lock = FolderLock(folder, "detrforge run")
    lock.acquire()
    _holder_file(folder)  # someone removed ours by hand and another took it
    lock.release()
    assert json.loads(lock_path(folder).read_text())["host"] == "node-17"
