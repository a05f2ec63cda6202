"""What a training run needs on the device, estimated before it starts.

The parts (bytes):

- ``weights``: the frozen model weights as stored (bf16, fp16 or fp8). With offloading they may all
  stay in system memory;
- ``largest_layer``: one layer's weight cast for its forward (fp32 at most); a layer streamed from
  system memory is cast at each call, two in flight at once;
- ``adapters``: each adapter's parameters with their gradient and AdamW's two moments (fp32: 16 bytes
  an element), plus SODA's frozen SVD (``U``, ``σ``, ``Vh``: 4 bytes an element);
- ``activations``: what backward keeps, as a multiple of the host's own estimate for one inference
  forward of the batch (:data:`ACTIVATION_FACTOR`; ComfyUI calibrates that estimate per model family).

:attr:`MemoryEstimate.floor` is what no offloading removes: a run whose floor exceeds the device's
memory cannot start. The factors are rough (set from typical SD1.5 LoRA training at 512² and Flux's at
1024², batch 1; not yet measured on a GPU here): the estimate names an order of magnitude, not a peak.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapters import METHODS, SODA, soda_preset

# Activations kept for backward, in units of the host's inference estimate: without and with
# gradient checkpointing (which keeps each block's input and recomputes the rest).
ACTIVATION_FACTOR = {False: 40.0, True: 6.0}
OPTIMIZER_BYTES = 16  # fp32 parameter, gradient and AdamW's two moments
BUFFER_BYTES = 4  # fp32


def gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    largest_layer: int
    adapters: int
    activations: int

    @property
    def floor(self) -> int:
        """Bytes the device needs with every weight streamed from system memory."""
        return self.adapters + self.activations + 2 * self.largest_layer

    @property
    def full(self) -> int:
        """Bytes the device needs with every weight on it."""
        return self.adapters + self.activations + self.weights

    def describe(self) -> str:
        return (
            f"activations ≈ {gib(self.activations)}, adapters and optimizer {gib(self.adapters)}, "
            f"model weights {gib(self.weights)} (largest layer {gib(self.largest_layer)})"
        )


@functools.lru_cache(maxsize=256)
def adapter_training_bytes(method: str, weight_shape: tuple[int, ...], options: tuple[tuple[str, object], ...]) -> int:
    """Device bytes one layer's adapter takes in training (see the module docstring); ``options``:
    :attr:`tlora.options.TrainingOptions.adapter_options` as sorted pairs. Built on the meta device."""
    cls = METHODS[method]
    if cls is SODA:
        adapter = SODA(weight_shape, soda_preset(method)).to("meta")
        out, rank = adapter.out_features, adapter.rank
        svd = out * rank + rank + rank * adapter.in_features
    else:
        adapter = cls.create_train(method, torch.empty(weight_shape, device="meta"), **dict(options)).to("meta")
        svd = 0
    return OPTIMIZER_BYTES * sum(p.numel() for p in adapter.parameters()) + BUFFER_BYTES * svd


def estimate(
    method: str,
    weight_shapes: Sequence[tuple[int, ...]],
    adapter_options: dict,
    *,
    weights: int,
    largest_layer: int,
    inference_activations: float,
    gradient_checkpointing: bool,
) -> MemoryEstimate:
    """The run's :class:`MemoryEstimate`: adapters on ``weight_shapes`` (the adapted layers),
    ``inference_activations`` the host's estimate for one forward of a micro-batch."""
    options = tuple(sorted(adapter_options.items()))
    adapters = sum(adapter_training_bytes(method, tuple(shape), options) for shape in weight_shapes)
    activations = int(ACTIVATION_FACTOR[gradient_checkpointing] * inference_activations)
    return MemoryEstimate(weights, largest_layer, adapters, activations)
