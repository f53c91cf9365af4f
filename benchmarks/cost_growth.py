"""How the cost of one Deformable-DETR training step grows with image side and query count.

    python benchmarks/cost_growth.py --out results/ [--device cuda] [--dtype bf16]

Two sweeps of the R50 config of ``detr_step.py`` (same model, matcher, set criterion with
auxiliary losses and AdamW step; 91 classes): image size at the config's 300 queries, and the
number of queries at one size. Sizes are COCO-like landscape images: ``--sides 512`` means a
shorter side of 512 and a longer side of round(512 * 4 / 3) = 683 (capped at 1333, DETR's
largest resize); ``800x1333`` names both sides. Default grid: 512x683, 640x853, 800x1067 and
800x1333 at 300 queries; 100, 300 and 900 queries at 512x683 on CPU (a whole run takes ~15
minutes on 2 cores), at 800x1067 on CUDA.

Each point runs in a fresh subprocess, so its peak memory is its own: on CPU the process's peak
RSS (``ru_maxrss``) minus its RSS just before the first step (model, inputs and interpreter
excluded; optimizer state, activations and gradients included); on CUDA
``torch.cuda.max_memory_allocated`` minus the bytes allocated before the first step (both are
reported). Step time is the median of ``--steps`` steps after one warm-up step (synchronised on
CUDA). Forward GFLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one forward
after the timing: it counts convolutions and matrix products, not ``grid_sample``'s bilinear
sampling of the deformable attention, so it is a lower bound.

Writes ``<out>/cost_growth.json`` and ``<out>/cost_growth.md`` (a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from detr_step import CONFIGS, make_targets, ours_criterion, ours_model, step_fn, step_parser

MAX_SIDE = 1333


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 683): shorter side, 4:3 landscape, longer side capped; '800x1333' as is."""
    if "x" in text:
        height, width = (int(part) for part in text.split("x"))
        return height, width
    short = int(text)
    return short, min(round(short * 4 / 3), MAX_SIDE)


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; psutil is not a dependency of the project)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def forward_gflops(model: torch.nn.Module, images, mask) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:  # not under no_grad: its module tracker needs grad_fns; memory is measured
        model(images, mask)
    return counter.get_total_flops() / 1e9


def measure_point(args) -> dict:
    """One (size, queries) point in this process: build, warm up, time, count."""
    device = torch.device(args.device)
    spec = dict(CONFIGS[args.config], num_queries=args.point_queries)
    height, width = args.height, args.width
    torch.manual_seed(0)
    model = ours_model(spec, args.num_classes).to(device).train()
    images = torch.randn(args.batch, 3, height, width, device=device)
    mask = torch.zeros(args.batch, height, width, dtype=torch.bool, device=device)
    targets = make_targets(args.batch, args.num_classes, device)
    step = step_fn(model, images, mask, targets, device, args.dtype, False,
                   ours_criterion(args.num_classes))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = rss_bytes()
    times = []
    for index in range(1 + args.steps):  # the first is the warm-up (creates AdamW's state)
        begin = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if index:
            times.append((time.perf_counter() - begin) * 1000)
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "height": height, "width": width, "queries": args.point_queries, "batch": args.batch,
        "pixels": height * width, "ms": statistics.median(times), "ms_steps": times,
        "peak_mb": peak / 2**20, "before_step_mb": baseline / 2**20,
        "step_mem_mb": (peak - baseline) / 2**20,
        "params_m": params / 1e6, "trainable_params_m": trainable / 1e6,
        "fwd_gflops": None if args.no_flops else forward_gflops(model, images, mask),
    }


def run_point(args, sweep: str, size: tuple[int, int], queries: int) -> dict:
    """``measure_point`` in a fresh interpreter (same flags), its JSON read back."""
    command = [sys.executable, __file__, "--point", "--out", str(args.out), "--config", args.config,
               "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
               "--steps", str(args.steps), "--num-classes", str(args.num_classes),
               "--height", str(size[0]), "--width", str(size[1]),
               "--point-queries", str(queries)]
    if args.no_flops:
        command.append("--no-flops")
    print(f"cost_growth: {sweep} {size[0]}x{size[1]}, {queries} queries ...", flush=True)
    failed = {"height": size[0], "width": size[1], "queries": queries, "batch": args.batch}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.point_timeout)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"over --point-timeout {args.point_timeout} s"}
    if done.returncode != 0:  # e.g. out of memory at the largest size: the other points still run
        print(f"cost_growth: point {size} x {queries} failed:\n{done.stderr[-4000:]}", flush=True)
        return {**failed, "error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = [
        f"`cost_growth.py --config {report['config']}`, {report['device_name']} "
        f"({report['threads']} threads), torch {report['torch']}, {report['dtype']}, batch "
        f"{report['batch']}, median of {report['steps']} steps after 1 warm-up; memory: "
        f"{report['memory_kind']} above the value before the first step.",
        "",
        "| sweep | size | queries | Mpixels | step (ms) | step memory (MiB) | peak (MiB) "
        "| fwd GFLOPs (no grid_sample) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in report["points"]:
        if "error" in point:
            lines.append(f"| {point['sweep']} | {point['height']}x{point['width']} | {point['queries']} "
                         f"| failed: {point['error']} | | | | |")
            continue
        flops = "-" if point["fwd_gflops"] is None else f"{point['fwd_gflops']:.0f}"
        lines.append(
            f"| {point['sweep']} | {point['height']}x{point['width']} | {point['queries']} "
            f"| {point['pixels'] / 1e6:.2f} | {point['ms']:.0f} | {point['step_mem_mb']:.0f} "
            f"| {point['peak_mb']:.0f} | {flops} |")
    first = next((p for p in report["points"] if "error" not in p), None)
    if first:
        lines += ["", f"Parameters: {first['params_m']:.1f} M ({first['trainable_params_m']:.1f} M "
                  "trainable; the stem and first stage of the ResNet are frozen)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = step_parser(__doc__.split("\n\n")[0], "cost_growth.json/.md")
    parser.add_argument("--batch", type=int, default=None, help="images per step (1 CPU, 2 CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (2 CPU, 10 CUDA)")
    parser.add_argument("--sides", default="512,640,800,800x1333",
                        help="sizes of the size sweep: a shorter side (4:3) or HxW, comma-separated")
    parser.add_argument("--queries", default="100,300,900", help="query counts of the query sweep")
    parser.add_argument("--query-side", default=None,
                        help="the size of the query sweep (512 on CPU, 800 on CUDA)")
    parser.add_argument("--num-classes", type=int, default=91)
    parser.add_argument("--no-flops", action="store_true", help="skip the forward FLOP count")
    parser.add_argument("--point-timeout", type=int, default=1800, help="seconds per point")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--point-queries", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (2 if cuda else 1)
    args.steps = args.steps or (10 if cuda else 2)
    args.query_side = args.query_side or ("800" if cuda else "512")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.point:
        print(json.dumps(measure_point(args)))
        return
    side_queries = CONFIGS[args.config]["num_queries"]
    plan = [("size", parse_size(s), side_queries) for s in args.sides.split(",")]
    query_size = parse_size(args.query_side)
    plan += [("queries", query_size, int(q)) for q in args.queries.split(",")]
    done: dict[tuple, dict] = {}
    points = []
    for sweep, size, queries in plan:
        key = (*size, queries)
        if key not in done:  # a point in both sweeps runs once
            done[key] = run_point(args, sweep, size, queries)
        points.append({"sweep": sweep, **done[key]})
    device = torch.device(args.device)
    report = {
        "config": args.config, "spec": CONFIGS[args.config], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
        "batch": args.batch, "steps": args.steps, "num_classes": args.num_classes,
        "memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda"
        else "peak RSS",
        "points": points,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost_growth.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "cost_growth.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
