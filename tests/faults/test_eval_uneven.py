"""Evaluation under DeepSpeed ZeRO-3 with uneven batch counts per rank finishes, no hang.

A val split of 3 images, one per batch, on 2 ranks: rank 0 has 2 batches, rank 1 has 1. Every
ZeRO-3 forward all-gathers the partitioned weights, so without padding forwards rank 0's second
forward waits for a peer that never comes. The 2-rank metrics must equal a single-process
evaluation of the same weights (padding forwards are not counted).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.convert import coco_to_shards
from pipeline.data.samples import make_samples
from pipeline.dist import COLLECTIVE_TIMEOUT_ENV
from tests.torchrun_env import torchrun_env

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("eval_worker.py")
LAUNCH_TIMEOUT_S = 100  # a hang shows as the collective timeout (30 s) or as this


def _load_worker():
    spec = importlib.util.spec_from_file_location("eval_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _three_image_split(tmp_path: Path) -> Path:
    """Shards root with a val split of the first 3 tiny detection images."""
    make_samples(tmp_path / "samples", "tiny")
    detect = tmp_path / "samples" / "detect"
    coco = json.loads((detect / "annotations" / "instances_val.json").read_text())
    keep = {image["id"] for image in coco["images"][:3]}
    coco["images"] = [image for image in coco["images"] if image["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    subset = tmp_path / "instances_val3.json"
    subset.write_text(json.dumps(coco))
    coco_to_shards(detect / "raw" / "val", subset, tmp_path / "val3" / "val", shard_size=8,
                   split="val")
    return tmp_path / "val3"


def _env() -> dict[str, str]:
    return torchrun_env(**{COLLECTIVE_TIMEOUT_ENV: "30"})


def test_zero3_evaluation_with_uneven_batches_finishes_with_single_process_metrics(tmp_path):
    shards = _three_image_split(tmp_path)
    worker = _load_worker()
    counts = [sum(1 for _ in worker.val_loader(shards, rank, 2)) for rank in (0, 1)]
    assert counts == [2, 1]  # the uneven split this test is about
    out = tmp_path / "metrics.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(WORKER), str(shards), str(out)]
    try:
        done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"2-rank ZeRO-3 evaluation still running after {LAUNCH_TIMEOUT_S} s (hang)")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    distributed = json.loads(out.read_text())
    reference = worker.evaluate_plain(shards)
    assert set(distributed) == set(reference)
    assert distributed == pytest.approx(reference, abs=1e-6)
    assert reference["AP50"] > 0  # some box is found: equal metrics compare something


def _lockstep_rank(rank: int, root: str, counts: list[int]) -> None:
    import torch.distributed as torch_dist

    from pipeline.eval.lockstep import even_batches

    torch_dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                                  world_size=len(counts))
    batches = [{"images": torch.full((2, 1), float(10 * rank + i)), "targets": [i, -i], "tag": rank}
               for i in range(counts[rank])]
    seen = [(batch["images"].flatten().tolist(), batch["targets"], real)
            for batch, real in even_batches(batches)]
    Path(root, f"rank{rank}.json").write_text(json.dumps(seen))
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("counts", [[2, 0], [3, 1], [2, 2]], ids=["none", "fewer", "equal"])
def test_even_batches_pads_the_short_rank_with_one_sample(tmp_path, counts):
    import torch.multiprocessing as mp

    mp.spawn(_lockstep_rank, args=(str(tmp_path), counts), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == max(counts)
    for rank, count in enumerate(counts):
        real = [(images, targets) for images, targets, is_real in seen[rank] if is_real]
        assert real == [([10.0 * rank + i] * 2, [i, -i]) for i in range(count)]  # unchanged
        padding = [(images, targets) for images, targets, is_real in seen[rank] if not is_real]
        last = count - 1 if count else 0  # no batch at all: rank 0's first sample, lent
        source = rank if count else 0
        assert padding == [([10.0 * source + last], [last])] * (max(counts) - count)
