"""The one seam where ComfyUI versions differ (tested: 0.3.64 and 0.33.0). Feature checks only,
never version strings and never copies of host code."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import comfy.model_management
import comfy.ops
import latent_preview
import torch


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """``comfy.model_management.in_training`` set inside the block, as ComfyUI's own trainer sets
    it (newer models then avoid fused inference-only kernels that break backward); a ComfyUI
    without the flag has no such kernels."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before


def previewer(device, latent_format):
    """ComfyUI's previewer for ``latent_format`` (the user's preview method: TAESD or latent→RGB);
    with previews turned off in ComfyUI, latent→RGB, since the node was asked for previews."""
    found = latent_preview.get_previewer(device, latent_format)
    if found is not None:
        return found
    factors = [latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias]
    if "latent_rgb_factors_reshape" in inspect.signature(latent_preview.Latent2RGBPreviewer).parameters:
        factors.append(getattr(latent_format, "latent_rgb_factors_reshape", None))
    return latent_preview.Latent2RGBPreviewer(*factors)


def dequantized_weight(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """A layer's weight as its own forward computes with it, in fp32 on ``device``: ComfyUI's cast
    (``comfy.ops.cast_bias_weight``: copied from system memory when offloaded, fp8 upcast, LoRA
    patches applied), then dequantized where the cast leaves a quantized tensor (0.33's
    ``QuantizedTensor``), and times the layer's ``scale_weight`` where its forward applies one
    (0.3.64's scaled fp8 layers)."""
    weight = comfy.ops.cast_bias_weight(module, device=device, dtype=torch.float32)[0]
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) and hasattr(weight, "dequantize"):
        weight = weight.dequantize()
    scale = getattr(module, "scale_weight", None)
    if scale is not None:
        weight = weight * scale.to(device, torch.float32)
    return weight.float()
