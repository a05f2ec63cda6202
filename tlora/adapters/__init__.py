"""Adapters on one interface (:class:`~tlora.adapters.base.Adapter`): ``W' = f(W)``."""

from .base import Adapter, ConvArgs
from .tlora import PRESETS, TLoRA, TLoRAConfig, preset

__all__ = ["PRESETS", "Adapter", "ConvArgs", "TLoRA", "TLoRAConfig", "preset"]
