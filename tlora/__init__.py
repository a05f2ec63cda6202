"""comfyui-tlora's core: TLoRA / SODA / LoRA adapters in pure PyTorch (no ComfyUI import)."""

from .adapters import PRESETS, Adapter, ConvArgs, TLoRA, TLoRAConfig, preset
from .factorize import factorize

__all__ = ["PRESETS", "Adapter", "ConvArgs", "TLoRA", "TLoRAConfig", "factorize", "preset"]
