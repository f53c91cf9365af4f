"""Two real processes (gloo): equal batch counts per epoch, disjoint training data, exact-once eval.

Each training step does a collective, as a DDP step would: if the ranks disagreed on the number
of batches, one would wait forever (the test has a timeout for that case).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.samples import make_samples


def _worker(rank: int, world_size: int, root: str, results: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world_size
    )
    cfg = DetectionDataConfig(
        shards=f"{root}/samples/detect", batch_size=2, num_workers=1, train_scales=[64], max_size=96,
        eval_size=64, crop_prob=0.0, shuffle_buffer=8,
    )  # fmt: skip
    loader = build_detection_loader(cfg, "train", rank=rank, world_size=world_size, seed=5)
    train_ids, steps = [], 0
    for _ in range(2):
        for batch in loader:
            step = torch.tensor([1.0])
            dist.all_reduce(step)  # every rank must reach every step
            steps += 1
            train_ids += [t["image_id"] for t in batch["targets"]]
    val = build_detection_loader(cfg, "val", rank=rank, world_size=world_size)
    val_ids = [t["image_id"] for batch in val for t in batch["targets"]]
    Path(results, f"rank{rank}.json").write_text(
        json.dumps({"steps": steps, "train": train_ids, "val": val_ids})
    )
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_two_ranks_agree_on_steps_and_split_the_data(tmp_path):
    make_samples(tmp_path / "samples", "tiny")
    mp.spawn(_worker, args=(2, str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * (24 // 4)
    assert not set(ranks[0]["train"]) & set(ranks[1]["train"])
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(1, 11))
