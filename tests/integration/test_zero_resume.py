"""Exact resume under DeepSpeed ZeRO 1/2/3 with 2 real processes (gloo on CPU).

Per stage: one uninterrupted 20-step run, and one interrupted after step 12 then resumed to
step 20. ZeRO 2 and 3 are killed with SIGKILL (the last checkpoint is step 10); ZeRO-1 gets a
preemption signal on rank 1 alone, and both ranks must agree to stop, save step 12 and exit.
For ZeRO-3 the resumed run is also killed while saving step 15 (shards written, `latest` not
yet), and must resume from step 10 again.
Losses of every step (recomputed ones included) and final weights must equal the uninterrupted
run's; the ZeRO-3 export must load into a plain single-process model and give its outputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.torchrun_env import torchrun_env

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero_worker.py")
LAUNCH_TIMEOUT_S = 180


def _load_worker():
    spec = importlib.util.spec_from_file_location("zero_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return torchrun_env()


def _command(run_dir: Path, zero_stage: int, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), str(WORKER), "--run-dir", str(run_dir), "--zero-stage", str(zero_stage), *extra]


def _launch(run_dir: Path, zero_stage: int, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(_command(run_dir, zero_stage, *extra, nproc=nproc), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _launch_ok(run_dir: Path, zero_stage: int, *extra: str, nproc: int = 2) -> str:
    done = _launch(run_dir, zero_stage, *extra, nproc=nproc)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


def _launch_and_kill_when_hanging(run_dir: Path, zero_stage: int, step: int) -> None:
    """Start a run that hangs inside the save of `step`; SIGKILL its process group then."""
    proc = subprocess.Popen(_command(run_dir, zero_stage, "--hang-saving-step", str(step)),
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not (run_dir / "hanging").exists():
            assert proc.poll() is None, f"worker exited with {proc.returncode} before hanging"
            assert time.monotonic() < deadline, "worker never reached the hanging save"
            time.sleep(0.2)
    finally:
        # torchrun starts each rank in a session of its own: kill the whole tree, not the group.
        import psutil

        tree = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _losses(run_dir: Path, rank: int) -> list[tuple[int, float]]:
    lines = (run_dir / f"losses_rank{rank}.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from pipeline.export import load_export

    return load_export(run_dir / "export")[0]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"zero{s}")
def runs(request, tmp_path_factory):
    """(zero_stage, straight run folder, interrupted-and-resumed run folder, resume logs)."""
    stage = request.param
    root = tmp_path_factory.mktemp(f"zero{stage}")
    straight, interrupted = root / "straight", root / "interrupted"
    _launch_ok(straight, stage)
    logs = {}
    if stage == 1:
        logs["stop"] = _launch_ok(interrupted, stage, "--signal-rank1-at-step", "12")
        logs["expected_resume_step"] = 12
    else:
        killed = _launch(interrupted, stage, "--die-at-step", "12")
        assert killed.returncode != 0, "the worker should have been killed at step 12"
        logs["expected_resume_step"] = 10
    logs["latest_after_interrupt"] = (interrupted / "latest").read_text().strip()
    if stage == 3:
        _launch_and_kill_when_hanging(interrupted, stage, step=15)
        logs["after_hang"] = {
            "latest": (interrupted / "latest").read_text().strip(),
            "step_15_complete": (interrupted / "checkpoints/step_15/COMPLETE").exists(),
            "step_15_exists": (interrupted / "checkpoints/step_15").exists(),
        }
    logs["resume"] = _launch_ok(interrupted, stage)
    return stage, straight, interrupted, logs


def test_resume_reports_exact_resume_from_last_checkpoint(runs):
    _, _, interrupted, logs = runs
    step = logs["expected_resume_step"]
    assert logs["latest_after_interrupt"] == f"step_{step}"
    assert f"resumed exactly from {interrupted / 'checkpoints' / f'step_{step}'}" in logs["resume"]


def test_signal_on_one_rank_stops_all_ranks_after_a_save(runs):
    stage, _, _, logs = runs
    if stage != 1:
        pytest.skip("the graceful-stop scenario runs once, with ZeRO-1")
    assert "stopped at step 12 on request" in logs["stop"]


@pytest.mark.parametrize("rank", [0, 1])
def test_losses_after_resume_equal_uninterrupted_run(runs, rank):
    _, straight, interrupted, _ = runs
    reference = dict(_losses(straight, rank))
    assert sorted(reference) == list(range(1, 21))
    resumed = _losses(interrupted, rank)
    # Steps 11-12 ran once per launch after the step-10 save, and every run must match.
    launches_after_step_10 = {1: 1, 2: 2, 3: 3}[runs[0]]  # stop | kill | kill + hang in save
    assert [step for step, _ in resumed].count(11) == launches_after_step_10
    assert {step for step, _ in resumed} == set(range(1, 21))
    for step, loss in resumed:
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_final_weights_equal_uninterrupted_run(runs):
    _, straight, interrupted, _ = runs
    expected, got = _weights(straight), _weights(interrupted)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_training_moved_the_weights(runs):
    _, straight, _, _ = runs
    worker = _load_worker()
    fresh = worker.make_model().state_dict()
    trained = _weights(straight)
    assert any(not torch.allclose(fresh[k], trained[k]) for k in fresh)


def test_kill_during_save_keeps_previous_latest(runs):
    stage, _, interrupted, logs = runs
    if stage != 3:
        pytest.skip("the kill-during-save scenario runs once, with ZeRO-3")
    after = logs["after_hang"]
    assert after == {"latest": "step_10", "step_15_complete": False, "step_15_exists": True}
    # The resumed run cleaned the half-written folder and went on to finish.
    assert (interrupted / "latest").read_text().strip() == "step_20"


def test_export_loads_into_single_process_model_with_same_outputs(runs):
    from pipeline.export import load_partial

    stage, straight, _, _ = runs
    worker = _load_worker()
    model = worker.make_model(seed=99).eval()
    report = load_partial(model, _weights(straight))
    assert report.complete, str(report)
    with torch.no_grad():
        outputs = model(worker.probe_input())
    expected = torch.load(straight / "probe_outputs.pt", weights_only=True)
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_on_one_rank_is_skipped_everywhere_then_stops_after_saving(tmp_path):
    """Rank 1 alone sees NaN at micro-batch 3 (dropped on both ranks), then from micro-batch 6
    on: the guard saves step 4 aside (never as `latest`: a rerun resumes from the last good
    checkpoint) and stops both ranks with a clear error instead of hanging."""
    run_dir = tmp_path / "nan"
    done = _launch(run_dir, 2, "--nan-rank1-at", "3", "--nan-rank1-from", "6",
                   "--save-every", "100")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "NonFiniteLossError" in output, output[-3000:]
    assert "3 non-finite losses or gradient norms in a row at step 4" in output, output[-3000:]
    assert (run_dir / "checkpoints" / "diverged_step_4" / "COMPLETE").exists()
    assert not (run_dir / "latest").exists()  # no good checkpoint was made before
    for rank in (0, 1):
        assert [step for step, _ in _losses(run_dir, rank)] == [1, 2, 3, 4]
