"""Classification training batches decoded on the training device (``decode_on: device``).

With ``ClassificationDataConfig.decode_on = "device"`` the loader workers do not decode: they
read the JPEG header (the size), make the random crop and flip decisions with exactly the rng
draws of :class:`~pipeline.data.transforms.ClassificationAugment` and pass on the raw bytes
(:func:`jpeg_sample`). The stream, its resume position and every crop and flip are therefore
those of the CPU path for the same seed; only the pixels differ slightly (the CPU path decodes
at the reduced DCT scale the crop allows and snaps the crop to whole decoded pixels). The trainer decodes a batch with one batched
``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA; libjpeg on CPU, which the tests use), then
crops, resizes (antialiased bilinear) and flips each image there (:func:`decode_batch_on`).

Bad images. The workers skip what they can see cheaply as the CPU path would (unreadable
header; a file cut short, which has no end-of-image marker after its last scan), counted as
``corrupt_image`` in the loader's counter. An image that still fails on the device is decoded
again alone, on the device and then on the CPU; if that fails too it is left out of its batch
and counted in the ``skipped`` counter given to :func:`decode_batch_on` (the loader's).
A complete JPEG without an end-of-image marker decodes with PIL but not with libjpeg-turbo's
strict reader torchvision uses; the device path skips it.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipeline.data.errors import SkipSample
from pipeline.data.transforms import ClassificationAugment

SOS, EOI = b"\xff\xda", b"\xff\xd9"  # JPEG start-of-scan and end-of-image markers


def complete_jpeg(data: bytes, image: Image.Image) -> bytes:
    """JPEG bytes that torchvision can be handed: non-JPEG members (a hand-made shard's PNG) are
    re-encoded; a JPEG cut short raises SkipSample("corrupt_image"), as PIL's decode would.

    A scan's entropy-coded data never holds a marker (0xFF is stuffed), so a file whose last
    end-of-image marker does not follow its last start-of-scan marker was cut inside a scan.
    """
    if image.format != "JPEG":
        buffer = io.BytesIO()
        try:
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
        except (OSError, ValueError, SyntaxError) as exn:
            raise SkipSample("corrupt_image", str(exn)) from exn
        return buffer.getvalue()
    if not 0 <= data.rfind(SOS) < data.rfind(EOI):
        raise SkipSample("corrupt_image", "JPEG ends inside its image data (truncated)")
    return data


def jpeg_sample(
    data: bytes, image: Image.Image, augment: ClassificationAugment, rng: random.Random
) -> tuple[Tensor, tuple[int, int, int, int], bool]:
    """A worker's part: (bytes as (N,) uint8, crop box (x0, y0, x1, y1) pixels, flip).

    ``image`` is the header-only PIL image of ``data``; the rng draws are ClassificationAugment's.
    """
    box, flip = augment.draw(image.width, image.height, rng)
    payload = complete_jpeg(data, image)
    return torch.from_numpy(np.frombuffer(payload, np.uint8).copy()), box, flip


def _decode_one(jpeg: Tensor, device: torch.device) -> Tensor | None:
    """One image on ``device``, else on the CPU and moved there; None if neither can."""
    from torchvision.io import ImageReadMode, decode_jpeg

    for where in dict.fromkeys((device, torch.device("cpu"))):
        try:
            return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=where).to(device)
        except (RuntimeError, ValueError):
            continue
    return None


def decode_jpegs(jpegs: Sequence[Tensor], device: torch.device) -> list[Tensor | None]:
    """(3, H, W) uint8 RGB images on ``device`` (None for one that does not decode).

    One batched call (nvJPEG's batched decoder on CUDA); it fails as a whole when one image
    does (grayscale and CMYK convert, a corrupt scan does not), and then each image is retried
    alone, so a bad image costs its batch one slower decode, never a traceback.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        return [_decode_one(jpeg, device) for jpeg in jpegs]


def crop_resize_flip(image: Tensor, box: Sequence[int], flip: bool, size: int) -> Tensor:
    """(3, H, W) uint8 -> the crop ``box`` (x0, y0, x1, y1) resized to (3, size, size), mirrored
    if ``flip``: antialiased bilinear, the CPU path's kernel."""
    from torchvision.transforms.v2 import functional as tvf

    x0, y0, x1, y1 = (int(v) for v in box)
    out = tvf.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True)
    return out.flip(-1) if flip else out


def decode_batch_on(
    device: torch.device | str, batch: dict, size: int, skipped: Counter | None = None
) -> dict:
    """A ``decode_on: device`` batch -> the CPU path's batch, on ``device``:
    {"images": (B', 3, size, size) uint8, "labels": (B',) int64}.

    B' < B only when an image decodes nowhere (see the module docstring); each such image is
    counted as ``corrupt_image`` in ``skipped``. A batch without "jpegs" is returned unchanged.
    """
    if "jpegs" not in batch:
        return batch
    device = torch.device(device)
    decoded = decode_jpegs(batch["jpegs"], device)
    keep = [i for i, image in enumerate(decoded) if image is not None]
    if skipped is not None and len(keep) < len(decoded):
        skipped["corrupt_image"] += len(decoded) - len(keep)
    boxes, flips = batch["crops"].tolist(), batch["flips"].tolist()
    images = torch.empty((len(keep), 3, size, size), dtype=torch.uint8, device=device)
    # Resampling in float32 whatever the training step's autocast says (uint8 out anyway).
    with torch.autocast(device.type, enabled=False):
        for row, i in enumerate(keep):
            images[row] = crop_resize_flip(decoded[i], boxes[i], flips[i], size)
    labels = batch["labels"][keep] if len(keep) < len(decoded) else batch["labels"]
    return {"images": images, "labels": labels.to(device, non_blocking=True)}
