"""Adapters on one interface (:class:`~tlora.adapters.base.Adapter`): ``W' = f(W)``.

Two flat registries: :data:`ADAPTER_CLASSES`, the classes a file's groups are read with (each
declares its keys), and :data:`METHODS`, the class that builds each named method.
"""

from .base import Adapter, ConvArgs
from .lora import LoRA
from .soda import SODA, SODA_FACTORS, SODA_PRESETS, SODAConfig, combined_weight, soda_preset
from .tlora import PRESETS, TLoRA, TLoRAConfig, preset

ADAPTER_CLASSES: tuple[type[Adapter], ...] = (TLoRA, LoRA, SODA)
METHODS: dict[str, type[Adapter]] = {
    **{name: LoRA if name == "lora" else TLoRA for name in PRESETS},
    **dict.fromkeys(SODA_PRESETS, SODA),
}

__all__ = [
    "ADAPTER_CLASSES",
    "METHODS",
    "PRESETS",
    "SODA",
    "SODA_FACTORS",
    "SODA_PRESETS",
    "Adapter",
    "ConvArgs",
    "LoRA",
    "SODAConfig",
    "TLoRA",
    "TLoRAConfig",
    "combined_weight",
    "preset",
    "soda_preset",
]
