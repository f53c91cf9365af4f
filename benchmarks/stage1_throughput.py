"""Stage-1 training throughput in images/s per device: a timm classifier (ResNet-50, random init)
trained on generated ImageNet-like JPEG shards through the project's classification loader,
with the JPEGs decoded by the loader workers (``decode_on: cpu``) or on the device
(``decode_on: device``: nvJPEG on a GPU), against the same step on one batch kept on the device.

    python benchmarks/stage1_throughput.py --out results/ [--device auto|cuda|cpu]
        [--model resnet50] [--image-size 224] [--batch-size 128] [--images 512]
        [--workers 8] [--warmup 8] [--steps 30]

The defaults shown are the GPU's; on a CPU (``make bench`` on a laptop) they shrink to a
smoke-sized run (:data:`DEFAULTS`), whose numbers say nothing about a GPU.

Contenders, each one run of ``warmup`` untimed and ``steps`` timed training steps (forward,
cross-entropy, backward, SGD with momentum; bf16 autocast on CUDA; channels_last):

- ``synthetic``: one uint8 batch already on the device (the model's own limit);
- ``cpu``: the loader with ``--workers`` workers decoding and augmenting (PIL, draft mode);
- ``device``: the workers read headers and draw crops; the batch is decoded, cropped, resized
  and flipped on the device (``pipeline.data.device_decode.decode_batch_on``);
- ``device_decode_only``: that decoding alone, on batches already read (no training step).

The JPEGs are the ``imagenet`` preset of ``benchmarks/data_loader.py`` (varied sizes around
400x350, ~110 KB) in shards written as the converters write them. Writes
``<out>/stage1_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from data_loader import PRESETS, make_jpegs, write_shards

from pipeline.data.classification import ClassificationDataConfig, build_classification_loader
from pipeline.data.device_decode import decode_batch_on
from pipeline.data.transforms import normalize_images

NUM_CLASSES = 10  # the preset writer's labels
DEFAULTS = {
    "cuda": dict(model="resnet50", image_size=224, batch_size=128, images=512, workers=8,
                 warmup=8, steps=30),
    "cpu": dict(model="resnet18", image_size=96, batch_size=16, images=48, workers=2, warmup=1,
                steps=3),
}


def train_step_fn(model_name: str, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """(uint8 images on device, labels) -> one optimizer step of a fresh classifier."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    use_bf16 = device.type == "cuda"

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        inputs = normalize_images(images).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = torch.nn.functional.cross_entropy(model(inputs).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(batches: Iterator, handle: Callable, warmup: int, steps: int, device: torch.device,
          batch_size: int) -> float:
    """images/s over ``steps`` calls of ``handle(batch)`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        handle(next(batches))
    sync(device)
    begin = time.perf_counter()
    for _ in range(steps):
        handle(next(batches))
    sync(device)
    return steps * batch_size / (time.perf_counter() - begin)


def loader_cfg(root: Path, args: argparse.Namespace, decode_on: str) -> ClassificationDataConfig:
    return ClassificationDataConfig(
        shards=str(root), batch_size=args.batch_size, num_workers=args.workers,
        image_size=args.image_size, crop_scale=[0.08, 1.0], shuffle_buffer=256,
        steps_per_epoch=args.warmup + args.steps, decode_on=decode_on)  # fmt: skip


def run(args: argparse.Namespace, root: Path, device: torch.device) -> dict:
    step = train_step_fn(args.model, device)
    size, batch = args.image_size, args.batch_size
    rates, skipped = {}, {}

    fixed = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    fixed_labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    forever = iter(lambda: (fixed, fixed_labels), None)
    rates["synthetic"] = timed(forever, lambda b: step(*b), args.warmup, args.steps, device, batch)

    def on_cpu(b: dict) -> None:
        step(b["images"].to(device, non_blocking=True), b["labels"].to(device, non_blocking=True))

    for decode_on in ("cpu", "device"):
        loader = build_classification_loader(loader_cfg(root, args, decode_on), "train")

        def on_device(b: dict, loader=loader) -> None:
            decoded = decode_batch_on(device, b, size, loader.skipped)
            step(decoded["images"], decoded["labels"])

        handle = on_cpu if decode_on == "cpu" else on_device
        rates[decode_on] = timed(iter(loader), handle, args.warmup, args.steps, device, batch)
        skipped[decode_on] = dict(loader.skipped)

    # The device decoding alone: a few raw batches read once, decoded over and over.
    loader = build_classification_loader(loader_cfg(root, args, "device"), "train")
    raw = [b for _, b in zip(range(min(4, args.warmup + args.steps)), loader)]
    cycle = (raw[i % len(raw)] for i in range(10**9))
    rates["device_decode_only"] = timed(cycle, lambda b: decode_batch_on(device, b, size),
                                        args.warmup, args.steps, device, batch)
    return {"images_per_s": rates, "skipped": skipped}


def machine(device: torch.device) -> dict:
    import torchvision

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the JSON")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument("--model", help="timm model name (random init; GPU default resnet50)")
    parser.add_argument("--image-size", type=int, help="training crop side (224)")
    parser.add_argument("--batch-size", type=int, help="images per step (128)")
    parser.add_argument("--images", type=int, help="generated JPEGs (512)")
    parser.add_argument("--workers", type=int, help="loader workers (8)")
    parser.add_argument("--warmup", type=int, help="untimed steps per contender (8)")
    parser.add_argument("--steps", type=int, help="timed steps per contender (30)")
    args = parser.parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    preset = PRESETS["imagenet"]
    begin = time.perf_counter()
    jpegs = make_jpegs(preset, args.images + 8, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shards(Path(tmp) / "imagenet", preset, jpegs)
        made = time.perf_counter() - begin
        result = run(args, root, device)
    report = {
        "machine": machine(device),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {"images": len(jpegs), "mean_kb": sum(len(d) for d, _ in jpegs) / len(jpegs) / 1024,
                 "generate_s": round(made, 1)},
        **result,
        "ratio_over_synthetic": {k: v / result["images_per_s"]["synthetic"]
                                 for k, v in result["images_per_s"].items() if k != "synthetic"},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage1_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.model} {args.image_size}px batch {args.batch_size} on {device}, "
          f"{args.workers} workers, {len(jpegs)} JPEGs of {report['data']['mean_kb']:.0f} KB")
    for key, rate in result["images_per_s"].items():
        print(f"  {key:20s} {rate:9.1f} img/s")


if __name__ == "__main__":
    main()
