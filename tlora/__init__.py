"""comfyui-tlora's core: TLoRA / SODA / LoRA adapters in pure PyTorch (no ComfyUI import)."""

from .adapters import (
    METHODS,
    PRESETS,
    SODA,
    SODA_PRESETS,
    Adapter,
    ConvArgs,
    LoRA,
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
    "METHODS",
    "PRESETS",
    "SODA",
    "SODA_PRESETS",
    "Adapter",
    "ConvArgs",
    "LoRA",
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
