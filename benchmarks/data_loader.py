"""Images per second of the training loaders at real image sizes, side by side with peers and
limits in the same run (interleaved rounds, medians), on generated JPEGs (no download).

    python benchmarks/data_loader.py --out results/ [--preset imagenet|coco] [--images 160]
        [--rounds 3] [--workers 1]

Presets: ``imagenet``: varied sizes around 400x350, ~110 KB per JPEG, 224 px training crops
(classification loader); ``coco``: 640x480, ~160 KB, a few boxes per image, DETR's training
recipe (shorter side 480-800, max 1333; detection loader). The JPEGs are written as webdataset
shards with the project's shard writer, as the converters do.

Contenders, each timed once per round over all images, one process, rounds interleaved:

- ``ours``: the loader in-process (``num_workers=0``: what one worker does, plus collate);
  ``ours_wN`` with ``--workers N`` (main process + N workers, for reference);
- imagenet: ``timm``: decode + ``timm.data.create_transform(224, is_training=True)``;
- coco: ``hf``: decode + ``DeformableDetrImageProcessor`` (if transformers is installed);
  ``tv2``: decode + torchvision ``transforms.v2`` DETR recipe (flip, random shortest side,
  normalise, with boxes);
- limits: ``decode`` (PIL, full size), ``decode_draft`` (PIL at the DCT scale a 224 crop of
  the whole image allows), coco ``decode_resize`` (decode + one PIL bilinear resize to the
  recipe's size) and ``decode_resize_torch`` (the same resize with torch's uint8 bilinear
  kernel, the one the loader uses).

One torch thread (``--threads``, default 1): a loader worker's share of a core, as the
DataLoader sets it in its workers.

Writes ``<out>/data_loader_<preset>.json``: per contender the median images/s and per-round
rates, and the median of per-round ratios ours / peer.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.classification import ClassificationDataConfig, build_classification_loader
from pipeline.data.detection import DetectionDataConfig, build_detection_loader
from pipeline.data.shards import ShardInfo, shard_name, write_shard_info, write_tar

PRESETS = {
    "imagenet": dict(kind="classification", side=(250, 560), aspect=(0.6, 1.1), kb=110, size=224),
    "coco": dict(kind="detection", side=(640, 640), aspect=(0.75, 0.75), kb=160, size=800),
}
DETR_SCALES = list(range(480, 801, 32))


def _textured(width: int, height: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Smooth colour field + fine texture: compresses like a photo at quality 90."""
    coarse = rng.integers(0, 255, (height // 16 + 2, width // 16 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    fine = rng.normal(0, noise, (height, width, 1)) * np.array([1.0, 0.9, 1.1])
    return (smooth + fine).clip(0, 255).astype(np.uint8)


def make_jpegs(preset: dict, count: int, seed: int) -> list[tuple[bytes, tuple[int, int]]]:
    """``count`` JPEGs with the preset's sizes; texture calibrated to its bytes per image."""
    rng = np.random.default_rng(seed)
    out, noise = [], 20.0
    for i in range(count):
        width = int(rng.integers(preset["side"][0], preset["side"][1] + 1))
        height = int(round(width * rng.uniform(*preset["aspect"])))
        buffer = io.BytesIO()
        Image.fromarray(_textured(width, height, rng, noise)).save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
        if i < 8:  # calibrate the texture on the first images: bytes grow about with noise
            noise *= (preset["kb"] * 1024 / len(data)) ** 0.7
        out.append((data, (width, height)))
    return out[8:] if count > 16 else out


def write_shards(root: Path, preset: dict, jpegs: list, per_shard: int = 32) -> Path:
    """The JPEGs as a train split of webdataset shards (+ _info.json), as the converters write."""
    split = root / "train"
    split.mkdir(parents=True, exist_ok=True)
    rng, names, counts = random.Random(0), [], []
    categories = [{"id": i + 1, "name": f"c{i}"} for i in range(10)]
    for index in range(0, len(jpegs), per_shard):
        samples = []
        for j, (data, (w, h)) in enumerate(jpegs[index : index + per_shard], start=index):
            if preset["kind"] == "classification":
                samples.append((f"{j:08d}", {"jpg": data, "cls": str(j % 10).encode()}))
                continue
            anns = []
            for k in range(rng.randint(2, 9)):
                bw, bh = rng.uniform(20, w / 2), rng.uniform(20, h / 2)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                anns.append({"id": j * 100 + k, "image_id": j, "category_id": rng.randint(1, 10),
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})  # fmt: skip
            record = {"image": {"id": j, "width": w, "height": h}, "annotations": anns}
            samples.append((f"{j:08d}", {"jpg": data, "json": json.dumps(record).encode()}))
        names.append(shard_name(len(names)))
        counts.append(len(samples))
        write_tar(split / names[-1], samples)
    write_shard_info(ShardInfo(root=split, kind=preset["kind"], split="train", shards=names,
                               counts=counts, categories=categories))  # fmt: skip
    return root


def _decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _draft_decoded(data: bytes, size: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (max(size, image.width // 8), max(size, image.height // 8)))
    return image.convert("RGB")


def timm_fn(size: int) -> Callable[[bytes, dict], object]:
    from timm.data import create_transform

    transform = create_transform(size, is_training=True)
    return lambda data, _: transform(_decoded(data))


def hf_fn() -> Callable[[bytes, dict], object] | None:
    try:
        from transformers import DeformableDetrImageProcessor
    except ImportError:
        return None
    processor = DeformableDetrImageProcessor()  # DETR's eval size: shortest 800, longest 1333

    def run(data: bytes, record: dict):
        annotations = {"image_id": record["image"]["id"], "annotations": record["annotations"]}
        return processor(images=_decoded(data), annotations=annotations, return_tensors="pt")

    return run


def tv2_fn() -> Callable[[bytes, dict], object]:
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.RandomHorizontalFlip(), v2.RandomShortestSize(DETR_SCALES, max_size=1333),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip

    def run(data: bytes, record: dict):
        image = _decoded(data)
        boxes = [a["bbox"] for a in record["annotations"]]
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=image.size[::-1])
        return transform(image, {"boxes": boxes})

    return run


def detr_resized_size(image: Image.Image, rng: random.Random) -> tuple[int, int]:
    """(width, height) of DETR's random shorter-side resize (longer side <= 1333)."""
    scale = min(rng.choice(DETR_SCALES) / min(image.size), 1333 / max(image.size))
    return round(image.width * scale), round(image.height * scale)


def decode_resize_fn(data: bytes, _: dict, rng=random.Random(0)) -> Image.Image:
    image = _decoded(data)
    return image.resize(detr_resized_size(image, rng), Image.BILINEAR)


def decode_resize_torch_fn(data: bytes, _: dict, rng=random.Random(0)) -> torch.Tensor:
    image = _decoded(data)
    width, height = detr_resized_size(image, rng)
    chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return F.interpolate(chw[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def per_image_rate(fn: Callable[[bytes, dict], object], samples: list) -> float:
    begin = time.perf_counter()
    for data, record in samples:
        fn(data, record)
    return len(samples) / (time.perf_counter() - begin)


def loader_rate(build: Callable[[], object]) -> float:
    """One epoch of a fresh loader -> images/s after its first batch (start-up not counted)."""
    images, steady = 0, None
    for batch in build():
        if steady is None:
            steady = time.perf_counter()
            continue
        images += len(batch["images"])
    return images / (time.perf_counter() - steady)


def contenders(name: str, preset: dict, root: Path, n: int, workers: int) -> dict[str, Callable]:
    """name -> a callable returning images/s for one pass over the set."""
    batch = 32 if preset["kind"] == "classification" else 4
    steps = max(2, n // batch)

    def build(num_workers: int):
        if preset["kind"] == "classification":
            return lambda: build_classification_loader(ClassificationDataConfig(
                shards=str(root), batch_size=batch, num_workers=num_workers, image_size=224,
                shuffle_buffer=64, steps_per_epoch=steps))  # fmt: skip
        return lambda: build_detection_loader(DetectionDataConfig(
            shards=str(root), batch_size=batch, num_workers=num_workers, shuffle_buffer=32,
            steps_per_epoch=steps))  # fmt: skip

    from pipeline.data.shards import load_shard_info, read_tar

    info = load_shard_info(root / "train")
    samples = [(m["jpg"], json.loads(m["json"]) if "json" in m else None)
               for path in info.shard_paths for _, m in read_tar(path)]  # fmt: skip
    runs = {"ours": lambda: loader_rate(build(0))}
    if workers:
        runs[f"ours_w{workers}"] = lambda: loader_rate(build(workers))
    runs["decode"] = lambda: per_image_rate(lambda d, _: _decoded(d), samples)
    runs["decode_draft"] = lambda: per_image_rate(lambda d, _: _draft_decoded(d, 224), samples)
    if name == "imagenet":
        fn = timm_fn(preset["size"])
        runs["timm"] = lambda: per_image_rate(fn, samples)
    else:
        runs["decode_resize"] = lambda: per_image_rate(decode_resize_fn, samples)
        runs["decode_resize_torch"] = lambda: per_image_rate(decode_resize_torch_fn, samples)
        fns = {"tv2": tv2_fn(), "hf": hf_fn()}
        for key, fn in fns.items():
            if fn is not None:
                runs[key] = lambda fn=fn: per_image_rate(fn, samples)
    return runs


def run(name: str, count: int, rounds: int, workers: int) -> dict:
    preset = PRESETS[name]
    jpegs = make_jpegs(preset, count + 8, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shards(Path(tmp) / name, preset, jpegs)
        runs = contenders(name, preset, root, len(jpegs), workers)
        rates: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(rounds):
            for key, fn in runs.items():
                rates[key].append(fn())
    result = {
        "images": len(jpegs),
        "mean_kb": sum(len(d) for d, _ in jpegs) / len(jpegs) / 1024,
        "mean_size": [float(np.mean([s[i] for _, s in jpegs])) for i in (0, 1)],
        "images_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "per_round": rates,
    }
    result["ratio_ours_over"] = {
        k: statistics.median(o / p for o, p in zip(rates["ours"], v))
        for k, v in rates.items() if k != "ours"
    }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="all", choices=[*sorted(PRESETS), "all"],
                        help="image statistics to generate (default: both, one after the other)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the JSON")
    parser.add_argument("--images", type=int, default=160, help="generated images (default 160)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--workers", type=int, default=0, help="also time N loader workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in sorted(PRESETS) if args.preset == "all" else [args.preset]:
        report_preset(preset, args)


def report_preset(preset: str, args: argparse.Namespace) -> None:
    args = argparse.Namespace(**{**vars(args), "preset": preset})
    result = run(args.preset, args.images, args.rounds, args.workers)
    report = {
        "preset": args.preset,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg": os.getloadavg()},  # fmt: skip
        "rounds": args.rounds,
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"data_loader_{args.preset}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.preset}: {result['images']} images, {result['mean_kb']:.0f} KB, "
          f"{result['mean_size'][0]:.0f}x{result['mean_size'][1]:.0f} mean")  # fmt: skip
    for key, rate in result["images_per_s"].items():
        ratio = result["ratio_ours_over"].get(key)
        tail = f"   ours / {key} = {ratio:.2f}" if ratio else ""
        print(f"  {key:14s} {rate:8.1f} img/s{tail}")


if __name__ == "__main__":
    main()
