"""train.elastic_resume with real processes (gloo on CPU): a checkpoint of 2 DeepSpeed ZeRO-2
ranks resumed by 1.

- the engine: with the same global batch on both world sizes, the run resumed on 1 rank ends
  with the weights of the uninterrupted 2-rank run (the ZeRO-partitioned AdamW state and the
  schedule carried over; dropping the optimizer state changes the weights by ~1e-2);
- a tiny stage through `detrforge run`: stopped on 2 ranks after a checkpoint, rerun on 1 rank
  it fails with one line naming the switch; rerun with `train.elastic_resume=true` (the run
  folder is kept: the switch is not in the config hash) it resumes at the saved step with half
  the global batch and, with `optim.scale_lr_with_batch: linear`, half the peak lr, finishes,
  and `world_changes.json` records 2 -> 1.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.torchrun_env import torchrun_env

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("elastic_worker.py")
RECIPE = REPO / "configs" / "stages" / "backbone_pretrain" / "tiny.yaml"
TIMEOUT_S = 300


def _worker(run_dir: Path, phase: str, nproc: int) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), str(WORKER), "--run-dir", str(run_dir), "--phase", phase],
        cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def test_zero2_state_of_two_ranks_continues_on_one_as_the_uninterrupted_run(tmp_path):
    _worker(tmp_path, "save", nproc=2)
    out = _worker(tmp_path, "resume", nproc=1)
    assert "written by 2 ranks, with 1" in out and "at step 3" in out
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert set(resumed) == set(reference)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


# 16 images a step on 2 ranks (8 each), 8 on 1: the lr recipe is for 16.
OVERRIDES = ["model.name=resnet10t", "data.image_size=32", "data.batch_size=8",
             "data.num_workers=0", "data.shuffle_buffer=16", "strategy.kind=deepspeed",
             "strategy.zero_stage=2", "train.max_steps=12", "train.checkpoint_every=2",
             "train.eval_every=0", "train.log_every=1", "train.progress_bar=false",
             "optim.warmup_steps=0", "optim.scale_lr_with_batch=linear",
             "optim.base_batch_size=16", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    from pipeline.data.samples import make_samples

    out = tmp_path_factory.mktemp("samples")
    make_samples(out, size="tiny", seed=0)
    return out


def _pipeline(path: Path, samples: Path, processes: int, *extra: str) -> Path:
    stage = {"name": "backbone", "recipe": str(RECIPE), "processes": processes,
             "overrides": [f"data.shards={samples}/classify", *OVERRIDES, *extra]}
    path.write_text(json.dumps({"name": "elastic", "stages": [stage]}))  # JSON is YAML
    return path


def _detrforge(*args: str, cwd: Path, wait: bool = True):
    command = [str(Path(sys.executable).parent / "detrforge"), *args]
    env = torchrun_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _stop_after_first_checkpoint(pipeline: Path, workdir: Path, run_dir: Path) -> int:
    """Run the stage on 2 ranks and ask it to stop once a checkpoint exists; its last step."""
    proc = _detrforge("run", str(pipeline), "--workdir", str(workdir), cwd=pipeline.parent,
                      wait=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not (run_dir / "latest").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    (run_dir / "STOP_REQUESTED").write_text("test\n")
    output = proc.communicate(timeout=TIMEOUT_S)[0]
    assert "stopped" in output, output[-3000:]
    return int((run_dir / "latest").read_text().strip().removeprefix("step_"))


def test_stage_stopped_on_two_ranks_resumes_on_one_only_when_asked(tmp_path, samples):
    from pipeline.engine.schedule import lr_factor

    workdir, run_dir = tmp_path / "work", tmp_path / "work" / "elastic" / "backbone"
    step = _stop_after_first_checkpoint(_pipeline(tmp_path / "two.yaml", samples, 2), workdir,
                                        run_dir)
    assert step < 12

    refused = _detrforge("run", str(_pipeline(tmp_path / "one.yaml", samples, 1)),
                         "--workdir", str(workdir), cwd=tmp_path)
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.startswith("detrforge: ")]
    assert len(lines) == 1, refused.stderr[-3000:]
    assert "written by 2 ranks, this job has 1" in lines[0]
    assert "train.elastic_resume=true" in lines[0]
    assert (run_dir / "latest").read_text().strip() == f"step_{step}"  # nothing archived

    elastic = _detrforge("run", str(_pipeline(tmp_path / "one.yaml", samples, 1,
                                              "train.elastic_resume=true")),
                         "--workdir", str(workdir), cwd=tmp_path)
    assert elastic.returncode == 0, elastic.stdout[-3000:] + elastic.stderr[-3000:]
    assert f"step_{step}, written by 2 ranks, with 1" in elastic.stdout
    assert (run_dir / "DONE.json").is_file()
    events = json.loads((run_dir / "world_changes.json").read_text())
    assert len(events) == 1
    event = events[0]
    assert (event["step"], event["old_world_size"], event["new_world_size"]) == (step, 2, 1)
    assert (event["old_global_batch"], event["new_global_batch"]) == (16, 8)
    assert math.isclose(event["old_peak_lr"], 2e-3) and math.isclose(event["new_peak_lr"], 1e-3)

    # Each step once, and after the resume the cosine schedule goes on from the halved peak.
    records = [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text()
               .splitlines()]
    lrs = {r["step"]: r["metrics"]["train/lr"] for r in records if "train/lr" in r["metrics"]}
    assert sorted(lrs) == list(range(1, 13))
    for logged_step, lr in lrs.items():
        peak = 2e-3 if logged_step <= step else 1e-3
        factor = lr_factor(logged_step - 1, schedule="cosine", total_steps=12, min_lr_ratio=0.05)
        assert math.isclose(lr, peak * factor, rel_tol=1e-6), logged_step
    assert math.isclose(event["lr"], lrs[step + 1], rel_tol=1e-6)
