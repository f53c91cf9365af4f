"""What a detector's decoder computed in one forward, returned on request for the inspector.

``with record_decoder(model) as trace: outputs = model(images, padding_mask)`` fills ``trace``
with the tensors the model itself used (detached, never recomputed beside it): every decoder
layer's sampling locations and attention weights as handed to ``ms_deform_attn``, the valid
ratios that place them on the image, and every layer's class logits and boxes. Outside the block
nothing is recorded: each module checks one attribute that is None.

Shapes: B images, Q queries, H heads, L levels, P points per level and head, C class logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from pipeline.models.deformable_transformer import DeformableDecoder


@dataclass
class DecoderTrace:
    """One forward's decoder record (empty lists / None for what the model does not have: a
    single-scale DETR has no deformable attention)."""

    # per decoder layer {"sampling_locations": (B, Q, H, L, P, 2) normalised (x, y) over the
    # padded maps, "attention_weights": (B, Q, H, L, P)}, appended by the layers' MSDeformAttn
    attention: list[dict[str, Tensor]] = field(default_factory=list)
    valid_ratios: Tensor | None = None  # (B, L, 2) unpadded fraction (x, y) of each level's map
    layer_logits: Tensor | None = None  # (layers, B, Q, C) every decoder layer's class logits
    layer_boxes: Tensor | None = None  # (layers, B, Q, 4) every layer's cx, cy, w, h in [0, 1]

    @property
    def sampling_locations(self) -> list[Tensor]:
        return [layer["sampling_locations"] for layer in self.attention]

    @property
    def attention_weights(self) -> list[Tensor]:
        return [layer["attention_weights"] for layer in self.attention]

    def image_locations(self, layer: int) -> Tensor:
        """Layer ``layer``'s sampling locations as fractions of the unpadded image:
        (B, Q, H, L, P, 2); the model's are fractions of the padded maps."""
        ratios = self.valid_ratios[:, None, None, :, None, :]
        return self.attention[layer]["sampling_locations"] / ratios


@contextmanager
def record_decoder(model: nn.Module) -> Iterator[DecoderTrace]:
    """Record one forward of ``model`` (a detector or segmenter) into the yielded trace; a second
    forward inside the block appends a second set of layers (use one block per forward)."""
    trace = DecoderTrace()
    decoders = [m for m in model.modules() if isinstance(m, DeformableDecoder)]
    attention = [layer.cross_attn for decoder in decoders for layer in decoder.layers]
    detectors = [m for m in model.modules() if hasattr(type(m), "decoder_trace")]
    for module in attention:
        module.trace = trace.attention
    for module in [*decoders, *detectors]:
        module.decoder_trace = trace
    try:
        yield trace
    finally:
        for module in [*attention, *decoders, *detectors]:
            module.__dict__.pop("trace", None)
            module.__dict__.pop("decoder_trace", None)
