"""Peak memory of one segmenter training step at 1024 x 1024, with and without masked attention.

One step = forward, the set criterion (Hungarian matching, focal class, L1 + GIoU boxes and the
point-sampled mask and dice losses of every decoder layer), backward. For 100 and 300 queries and
each ``model.mask_attention`` ("none", "masked", "masked+boxes") the script runs the step in a
fresh subprocess, so that peak figures do not carry over:

- on CPU: ``step_peak_mb`` = the process's peak RSS after the step minus its RSS just before it
  (the model, the batch and the libraries are in the baseline; ``tracemalloc`` would miss torch's
  allocations, which bypass Python's allocator);
- on CUDA: ``torch.cuda.max_memory_allocated`` during the step.

The model is the COCO panoptic recipe's architecture with a ResNet-18 body and 1 encoder layer
(to keep a CPU run to minutes; the encoder's memory does not depend on the mode): hidden 256, mask
dim 256, stride-4 mask logits (256 x 256), 6 decoder layers, two-stage, box refinement; batch 1
with 20 objects. Usage: python benchmarks/segment_memory.py --out DIR (writes
DIR/segment_memory.json after every configuration; --queries / --modes pick a subset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = ("none", "masked", "masked+boxes")
QUERIES = (100, 300)
SIDE = 1024
OBJECTS = 20


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one_step(num_queries: int, mode: str) -> dict:
    """Build the model and a batch, run one training step, return the measured figures."""
    from pipeline.losses import HungarianMatcher, LossWeights, MaskLossConfig, SetCriterion
    from pipeline.models import BackboneConfig, DetectorConfig
    from pipeline.models.mask_head import MaskHeadConfig, SegmenterConfig, build_segmenter

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector = DetectorConfig(kind="deformable", num_classes=133, num_queries=num_queries, enc_layers=1,
                              dec_layers=6, dropout=0.0, two_stage=True, box_refine=True,
                              backbone=BackboneConfig(name="resnet18", out_strides=[8, 16, 32]))
    model = build_segmenter(SegmenterConfig(detector, MaskHeadConfig(mask_dim=256), mask_attention=mode))
    model.to(device).train()
    matcher = HungarianMatcher(focal=True, cost_class=2.0, cost_mask=5.0, cost_dice=5.0)
    criterion = SetCriterion(num_classes=133, matcher=matcher, focal=True, mask_loss=MaskLossConfig())
    weights = LossWeights(ce=2.0, bbox=5.0, giou=2.0, mask=5.0, dice=5.0)
    images = torch.randn(1, 3, SIDE, SIDE, device=device)
    padding = torch.zeros(1, SIDE, SIDE, dtype=torch.bool, device=device)
    corners = torch.rand(OBJECTS, 2) * 0.7
    sizes = torch.rand(OBJECTS, 2) * 0.25 + 0.05
    masks = torch.zeros(OBJECTS, SIDE, SIDE, dtype=torch.bool)
    for index, ((x, y), (w, h)) in enumerate(zip(corners.tolist(), sizes.tolist())):
        masks[index, int(y * SIDE):int((y + h) * SIDE), int(x * SIDE):int((x + w) * SIDE)] = True
    boxes = torch.cat([corners + sizes / 2, sizes], -1)
    targets = [{"labels": torch.randint(0, 133, (OBJECTS,)).to(device), "boxes": boxes.to(device),
                "masks": masks.to(device)}]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = current_rss_mb()
    start = time.perf_counter()
    total, _ = criterion.loss_and_metrics(model(images, padding), targets, weights, (SIDE, SIDE))
    total.backward()
    seconds = time.perf_counter() - start
    result = {"queries": num_queries, "mask_attention": mode, "device": device.type,
              "step_seconds": round(seconds, 2), "loss": round(float(total), 3)}
    if device.type == "cuda":
        result["step_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["step_peak_mb"] = round(peak_rss_mb() - before, 1)
        result["baseline_rss_mb"] = round(before, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--queries", type=int, nargs="+", default=list(QUERIES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--one", nargs=2, metavar=("QUERIES", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(int(args.one[0]), args.one[1])))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"side": SIDE, "objects": OBJECTS, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": []}
    for num_queries in args.queries:
        for mode in args.modes:
            run = subprocess.run([sys.executable, __file__, "--one", str(num_queries), mode],
                                 capture_output=True, text=True, check=True)
            report["rows"].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(report["rows"][-1], flush=True)
            (args.out / "segment_memory.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
