"""Loading a model for training within the device's memory: the run's estimate (the arithmetic is
``tlora/memory.py``), an early refusal naming the figure, and ComfyUI's partial loading (weights
that do not fit stay in system memory and are copied in at each use)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management
import torch

from ..tlora.memory import MemoryEstimate, estimate, gib
from ..tlora.model import release_inference_tensors
from ..tlora.options import TrainingOptions

log = logging.getLogger("comfyui-tlora")


MEMORY_ADVICE = "Enable gradient_checkpointing, lower batch_size or the image size, or adapt fewer layers (targets)."


def casts(module: torch.nn.Module) -> bool:
    """Whether ComfyUI casts this layer's weight at each call (``comfy_cast_weights``: fp8 or
    quantized weights, or weights left in system memory)."""
    return bool(getattr(module, "comfy_cast_weights", False))


def casting_layers(patchers) -> list[torch.nn.Module]:
    """The layers of the patchers' models that ComfyUI can cast at each call (its ops, with a weight)."""
    return [
        m
        for patcher in patchers
        for m in patcher.model.modules()
        if hasattr(m, "comfy_cast_weights") and getattr(m, "weight", None) is not None
    ]


def run_memory(mp, patchers, modules: dict, samples: torch.Tensor, options: TrainingOptions) -> MemoryEstimate:
    """The run's device memory (:mod:`tlora.memory`), activations from ComfyUI's own estimate for one
    forward of a micro-batch."""
    shape = [min(options.batch_size, samples.shape[0]), *samples.shape[1:]]
    return estimate(
        options.method,
        [tuple(m.weight.shape) for m in modules.values()],
        options.adapter_options,
        weights=sum(patcher.model_size() for patcher in patchers),
        largest_layer=4 * max(p.numel() for patcher in patchers for p in patcher.model.parameters()),
        inference_activations=mp.memory_required(shape),
        gradient_checkpointing=options.gradient_checkpointing,
    )


def check_memory(need: MemoryEstimate, device) -> None:
    """Refuse a run the device cannot hold even with every weight offloaded (on the CPU, weights
    included), naming the figure; else log it."""
    on_cpu = comfy.model_management.is_device_cpu(device)
    required = need.full if on_cpu else need.floor
    total = comfy.model_management.get_total_memory(device)
    if required > total:
        where = "" if on_cpu else " even with every model weight in system memory"
        raise ValueError(
            f"this run needs about {gib(required)} on {device}{where} ({need.describe()}), and {device} has "
            f"{gib(total)}. {MEMORY_ADVICE}"
        )
    log.info(
        "training memory on %s: about %s with every weight on it, %s with weights offloaded (%s)",
        device,
        gib(need.full),
        gib(need.floor),
        need.describe(),
    )


@dataclass
class WeightBudget:
    """How many model weights stay on the device: all that fit beside ``reserve`` bytes (the run's
    own memory), and at most ``limit_gib`` when set (0: no limit). The rest stays in system memory
    (ComfyUI's partial loading: those layers copy their weight in at each use)."""

    reserve: int
    limit_gib: float

    def fit(self, patcher) -> bool:
        """Unload weights of a loaded ``patcher`` beyond the budget; whether any are offloaded."""
        device = patcher.load_device
        excess = patcher.loaded_size() - int(self.limit_gib * 2**30) if self.limit_gib else 0
        if not comfy.model_management.is_device_cpu(device):
            excess = max(excess, self.reserve - comfy.model_management.get_free_memory(device))
        if excess > 0:
            patcher.partially_unload(patcher.offload_device, excess)
        return patcher.loaded_size() < patcher.model_size()

    def wrapper(self, executor, patcher, *args, **kwargs):
        """ComfyUI's sampler loads the model again for inference (more weights than training leaves
        room for): back to the budget after it."""
        prepared = executor(patcher, *args, **kwargs)
        self.fit(patcher)
        release_inference_tensors(patcher.model)
        return prepared
