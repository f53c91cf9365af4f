"""Smoke runs of benchmarks/cost_growth.py and benchmarks/zero_memory.py --model detector at the
tiny config and tiny sizes, one step: the scripts run end to end and write their reports.

Only the shape of the output and positive numbers are checked: whether a larger image costs more
is a measurement (noisy on a shared CPU), not a test. ~35 s on 2 cores for both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def run_script(name: str, *flags: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *flags], env=env,
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]


def test_cost_growth_tiny(tmp_path):
    run_script("cost_growth.py", "--out", str(tmp_path), "--config", "tiny", "--device", "cpu",
               "--sides", "64,64x96", "--queries", "10,50", "--query-side", "64", "--steps", "1")
    report = json.loads((tmp_path / "cost_growth.json").read_text())
    assert report["config"] == "tiny" and report["batch"] == 1 and report["steps"] == 1
    sizes = [(p["sweep"], p["height"], p["width"], p["queries"]) for p in report["points"]]
    # 64 -> 64x85 (4:3); the 64x85, 50-query point is in both sweeps (measured once)
    assert sizes == [("size", 64, 85, 50), ("size", 64, 96, 50), ("queries", 64, 85, 10),
                     ("queries", 64, 85, 50)]
    for point in report["points"]:
        assert len(point["ms_steps"]) == 1
        for key in ("ms", "peak_mb", "step_mem_mb", "params_m", "fwd_gflops"):
            assert point[key] > 0, (key, point)
        assert point["pixels"] == point["height"] * point["width"]
    table = (tmp_path / "cost_growth.md").read_text()
    assert table.count("\n| size |") == 2 and table.count("\n| queries |") == 2


def test_cost_growth_records_a_failed_point_and_goes_on(tmp_path):
    # one second is too short for any point's interpreter to start: each is recorded as failed
    run_script("cost_growth.py", "--out", str(tmp_path), "--config", "tiny", "--device", "cpu",
               "--sides", "64", "--queries", "10", "--query-side", "64", "--steps", "1",
               "--point-timeout", "1")
    report = json.loads((tmp_path / "cost_growth.json").read_text())
    assert [p["error"] for p in report["points"]] == ["over --point-timeout 1 s"] * 2
    assert (tmp_path / "cost_growth.md").read_text().count("failed: over --point-timeout") == 2


@pytest.mark.dist
def test_zero_memory_detector_tiny(tmp_path):
    run_script("zero_memory.py", "--out", str(tmp_path), "--model", "detector", "--config", "tiny",
               "--height", "64", "--width", "64", "--steps", "1", "--stages", "0,2")
    report = json.loads((tmp_path / "zero_memory_detector.json").read_text())
    assert report["model"].startswith("Deformable-DETR tiny") and report["num_params"] > 0
    assert sorted(report["stages"]) == ["zero0", "zero2"]
    for records in report["stages"].values():
        assert sorted(r["rank"] for r in records) == [0, 1]
        for record in records:
            counts = record["tensor_bytes"]
            assert counts["params"] > 0 and counts["optimizer"] > 0 and counts["all_tensors"] > 0
            assert record.get("peak_rss_bytes", record.get("cuda_max_memory_allocated", 0)) > 0
            assert record["seconds_for_1_steps"] > 0
