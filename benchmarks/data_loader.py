"""Images per second of the training loaders (read + decode + augment + collate, N workers)
against raw JPEG decoding of the same images, on the same machine in the same run.

    python benchmarks/data_loader.py --out results/ [--data DIR] [--workers 2] [--epochs 2]

Without ``--data`` the small sample sets are generated into a temporary folder first. Writes
``<out>/data_loader.json`` with, per set (detect with masks, detect boxes only, classify): the
loader's images/s in steady state (after its first batch, so worker start-up is reported apart),
raw decoding images/s (PIL, one process, the JPEG bytes read from the same shards) and
their ratio (loader / raw decode).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.data.classification import ClassificationDataConfig, build_classification_loader
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.samples import make_samples
from pipeline.data.shards import load_shard_info, read_tar


def raw_decode_rate(split_dir: Path, repeats: int) -> dict:
    """Decode every JPEG of a shard set ``repeats`` times in this process -> images/s."""
    blobs = [m["jpg"] for path in load_shard_info(split_dir).shard_paths for _, m in read_tar(path)]
    begin = time.perf_counter()
    for _ in range(repeats):
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                image.convert("RGB")
    seconds = time.perf_counter() - begin
    return {
        "images": len(blobs) * repeats,
        "seconds": seconds,
        "images_per_s": len(blobs) * repeats / seconds,
    }


def loader_rate(loader, epochs: int) -> dict:
    """Run ``epochs`` epochs -> steady images/s (after the first batch) and the start-up time."""
    begin = time.perf_counter()
    first_batch_s, images = None, 0
    for _ in range(epochs):
        for batch in loader:
            count = len(batch["images"])
            if first_batch_s is None:
                first_batch_s, steady_begin = time.perf_counter() - begin, time.perf_counter()
                continue
            images += count
    seconds = time.perf_counter() - steady_begin
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "first_batch_s": first_batch_s,
    }


def detect_config(root: Path, workers: int, with_masks: bool) -> DetectionDataConfig:
    """The small demo's detection settings: DETR's recipe scaled to ~128 px images."""
    return DetectionDataConfig(
        shards=str(root), batch_size=4, num_workers=workers, train_scales=[96, 112, 128, 144],
        max_size=224, crop_resize_scales=[96, 128], crop_min_size=64, crop_max_size=128,
        shuffle_buffer=100, with_masks=with_masks,
    )  # fmt: skip


def run(data: Path, workers: int, epochs: int) -> dict:
    results = {}
    cases = {
        "detect_masks": (data / "detect", lambda: build_detection_loader(detect_config(data / "detect", workers, True))),
        "detect_boxes": (data / "detect", lambda: build_detection_loader(detect_config(data / "detect", workers, False))),
        "classify": (
            data / "classify",
            lambda: build_classification_loader(
                ClassificationDataConfig(shards=str(data / "classify"), batch_size=32, num_workers=workers, image_size=64, shuffle_buffer=200)
            ),
        ),
    }  # fmt: skip
    for name, (root, build) in cases.items():
        raw = raw_decode_rate(root / "train", repeats=max(1, epochs))
        loaded = loader_rate(build(), epochs)
        results[name] = {
            "loader": loaded,
            "raw_decode": raw,
            "ratio": loaded["images_per_s"] / raw["images_per_s"],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for data_loader.json")
    parser.add_argument("--data", help="sample sets root (default: generate the small sets)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loader (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "samples"
        if not args.data:
            make_samples(data, "small", seed=0)
        results = run(data, args.workers, args.epochs)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "workers": args.workers,
        "epochs": args.epochs,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_loader.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, row in results.items():
        print(
            f"{name:13s} loader {row['loader']['images_per_s']:8.1f} img/s   raw decode "
            f"{row['raw_decode']['images_per_s']:8.1f} img/s   ratio {row['ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
