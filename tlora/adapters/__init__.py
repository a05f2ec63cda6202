"""Adapters on one interface (:class:`~tlora.adapters.base.Adapter`): ``W' = f(W)``."""

from .base import Adapter, ConvArgs
from .soda import SODA, SODA_FACTORS, SODA_PRESETS, SODAConfig, combined_weight, soda_preset
from .tlora import PRESETS, TLoRA, TLoRAConfig, preset

__all__ = [
    "PRESETS",
    "SODA",
    "SODA_FACTORS",
    "SODA_PRESETS",
    "Adapter",
    "ConvArgs",
    "SODAConfig",
    "TLoRA",
    "TLoRAConfig",
    "combined_weight",
    "preset",
    "soda_preset",
]
