"""Batching: stack classification samples; pad detection images and build the padding mask."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.transforms import normalize_images


def collate_classification(samples: Sequence[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """[(image (3, H, W) uint8, label)] -> {"images": (B, 3, H, W) uint8, "labels": (B,) int64}.

    The model's input is ``normalize_images(batch["images"])`` (pipeline.data.transforms), done
    on the training device.
    """
    images = torch.from_numpy(np.stack([image.numpy() for image, _ in samples]))
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return {"images": images, "labels": labels}


def collate_jpeg_classification(samples: Sequence[tuple[tuple, int]]) -> dict:
    """[((jpeg (N,) uint8, crop box, flip), label)] -> the batch of ``decode_on: device``:
    {"jpegs": B (N_i,) uint8 tensors, "crops": (B, 4) int64 x0, y0, x1, y1, "flips": (B,) bool,
    "labels": (B,) int64}; ``pipeline.data.device_decode.decode_batch_on`` makes the images."""
    return {
        "jpegs": [jpeg for (jpeg, _, _), _ in samples],
        "crops": torch.tensor([box for (_, box, _), _ in samples], dtype=torch.int64).reshape(-1, 4),
        "flips": torch.tensor([flip for (_, _, flip), _ in samples], dtype=torch.bool),
        "labels": torch.tensor([label for _, label in samples], dtype=torch.int64),
    }


def collate_detection(samples: Sequence[tuple[Tensor, dict]], size_divisibility: int = 1) -> dict:
    """[(image (3, h_i, w_i), target)] -> the detection batch of the project's convention.

    Images are padded at the bottom and right to the largest (h, w) of the batch, rounded up to
    a multiple of ``size_divisibility``: "images" (B, 3, H, W) of the samples' dtype (uint8 from
    the loaders; padding 0, which ``normalize_images`` keeps at 0, the mean colour, after
    normalisation), "padding_mask" (B, H, W) bool True on padded pixels,
    "targets" list of B dicts, unchanged: "masks" stay (n, h_i, w_i), the unpadded image
    size, as the convention says; a mask loss pads them (as DETR's does) when it needs to.
    """
    if not samples:
        raise ValueError("collate_detection needs at least one sample")
    heights = [image.shape[1] for image, _ in samples]
    widths = [image.shape[2] for image, _ in samples]
    step = max(1, size_divisibility)
    height, width = -(-max(heights) // step) * step, -(-max(widths) // step) * step
    # numpy for the copies: single-threaded, no competition with the trainer's torch threads.
    dtype = samples[0][0].numpy().dtype
    images = np.zeros((len(samples), 3, height, width), dtype=dtype)
    padding_mask = np.ones((len(samples), height, width), dtype=bool)
    for i, (image, _) in enumerate(samples):
        h, w = image.shape[1:]
        images[i, :, :h, :w] = image.numpy()
        padding_mask[i, :h, :w] = False
    return {
        "images": torch.from_numpy(images),
        "padding_mask": torch.from_numpy(padding_mask),
        "targets": [target for _, target in samples],
    }


def model_images(batch: dict, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """A loader batch's "images" as the model takes them: (B, 3, H, W) ``dtype`` on ``device``,
    normalised with the ImageNet mean/std there (padding, per "padding_mask", is 0)."""
    images = batch["images"].to(device, non_blocking=True)
    return normalize_images(images, batch.get("padding_mask")).to(dtype)
