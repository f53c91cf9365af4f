"""The engine on GPUs: NCCL, bf16, ZeRO 2 and 3, exact resume and a usable fp32 export.

Uses the worker of tests/integration/ with --backend nccl --precision bf16 on
min(2, visible GPUs) ranks (NCCL needs one GPU per rank). Skipped without CUDA.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HERE = Path(__file__).resolve().parent
GPU_ARGS = ("--backend", "nccl", "--precision", "bf16")


def _integration():
    path = HERE.parent / "integration" / "test_zero_resume.py"
    spec = importlib.util.spec_from_file_location("zero_resume_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def helpers():
    pytest.importorskip("deepspeed")
    return _integration()


@pytest.fixture(scope="module")
def nproc():
    return min(2, torch.cuda.device_count())


def test_auto_precision_is_bf16_on_this_gpu():
    from pipeline.engine.strategy import resolve_precision

    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_zero_resume_on_gpu_matches_uninterrupted_run(helpers, nproc, zero_stage, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    helpers._launch_ok(straight, zero_stage, *GPU_ARGS, nproc=nproc)
    killed = helpers._launch(interrupted, zero_stage, "--die-at-step", "12", *GPU_ARGS, nproc=nproc)
    assert killed.returncode != 0
    logs = helpers._launch_ok(interrupted, zero_stage, *GPU_ARGS, nproc=nproc)
    assert "resumed exactly from" in logs and "step_10" in logs
    for rank in range(nproc):
        reference = dict(helpers._losses(straight, rank))
        resumed = helpers._losses(interrupted, rank)
        assert {step for step, _ in resumed} == set(range(1, 21))
        for step, loss in resumed:
            assert loss == pytest.approx(reference[step], rel=1e-3, abs=1e-4), f"step {step}"
    expected, got = helpers._weights(straight), helpers._weights(interrupted)
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-4, msg=key)

    from pipeline.export import load_partial

    worker = helpers._load_worker()
    model = worker.make_model(seed=99).eval()
    assert load_partial(model, expected).complete
    with torch.no_grad():
        outputs = model(worker.probe_input())
    bf16_outputs = torch.load(straight / "probe_outputs.pt", weights_only=True)
    # The probe ran in bf16 on the GPU; the export is the fp32 master copy.
    torch.testing.assert_close(outputs, bf16_outputs, rtol=5e-2, atol=5e-2)
