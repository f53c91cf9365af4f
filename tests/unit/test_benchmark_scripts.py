"""The step and loader benchmarks run end to end on the CPU at tiny sizes and write what
RESULTS.md reads from them (the ratios against the peers, the step's FLOPs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 240) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_step_benchmark_times_both_steps_and_counts_flops(tmp_path):
    _run("detr_step.py", "--out", str(tmp_path), "--config", "tiny", "--device", "cpu", "--height", "64",
         "--width", "96", "--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--clock", "cpu",
         "--peak-tflops", "1", "--attn-dtypes", "fp32,bf16", "--profile", "1")
    report = json.loads((tmp_path / "detr_step.json").read_text())
    assert report["clock"] == "cpu" and report["threads"] == 1
    step = report["train_step"]
    assert len(step["ours"]["ms_rounds"]) == 2 and step["ours"]["ms"] > 0
    assert step["ours"]["step_tflop"] > 0 and 0 < step["ours"]["mfu"] < 1
    if "hf" in step:  # the peer is an optional extra
        assert step["hf"]["params_m"] == step["ours"]["params_m"] and step["speedup_ours_over_hf"] > 0
    assert step["ours"]["profile"]["wall_ms"] > 0
    assert "aten::" in (tmp_path / "detr_step_profile.txt").read_text()
    attention = report["ms_deform_attn"]
    assert set(attention) == {"encoder", "decoder", "encoder_bf16", "decoder_bf16"}
    assert attention["encoder"]["ours_default"]["ms"] > 0
    assert attention["decoder_bf16"]["dtype"] == "torch.bfloat16" and attention["decoder_bf16"]["ours_default"]["ms"] > 0


def test_a_contender_that_fails_is_recorded_in_one_line_not_fatal():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from detr_step import first_call_failure
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def broken() -> None:
        raise RuntimeError("kernel did not compile\nlong compiler log")

    assert first_call_failure(broken) == "RuntimeError: kernel did not compile"
    assert first_call_failure(lambda: None) is None


def test_the_loader_benchmark_compares_ours_with_the_limits(tmp_path):
    _run("data_loader.py", "--preset", "coco", "--out", str(tmp_path), "--images", "8", "--rounds", "1")
    report = json.loads((tmp_path / "data_loader_coco.json").read_text())
    rates = report["images_per_s"]
    assert {"ours", "decode", "decode_resize", "decode_resize_torch"} <= set(rates)
    assert all(rate > 0 for rate in rates.values())
    assert set(report["ratio_ours_over"]) == set(rates) - {"ours"}


def test_gpu_all_without_a_gpu_says_so_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), str(tmp_path / "gpu")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpu_all.sh: {sys.executable} sees no CUDA device; on a CPU run 'make bench' (or set PYTHON)"]
    assert not (tmp_path / "gpu").exists(), "nothing half-written"
