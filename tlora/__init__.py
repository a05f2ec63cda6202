"""comfyui-tlora's core: TLoRA / SODA / LoRA adapters in pure PyTorch (no ComfyUI import)."""

from .adapters import (
    PRESETS,
    SODA,
    SODA_PRESETS,
    Adapter,
    ConvArgs,
    SODAConfig,
    TLoRA,
    TLoRAConfig,
    combined_weight,
    preset,
    soda_preset,
)
from .factorize import factorize
from .fingerprint import fingerprint
from .stiefel import StiefelAdam, soda_optimizers

__all__ = [
    "PRESETS",
    "SODA",
    "SODA_PRESETS",
    "Adapter",
    "ConvArgs",
    "SODAConfig",
    "StiefelAdam",
    "TLoRA",
    "TLoRAConfig",
    "combined_weight",
    "factorize",
    "fingerprint",
    "preset",
    "soda_optimizers",
    "soda_preset",
]
