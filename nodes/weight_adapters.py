"""TLoRA and SODA as ComfyUI weight adapters, so ComfyUI's own LoRA loading and patching
(Load LoRA, LoRA stacks, hooks, lowvram patches) handles this pack's files.

``load`` finds a module's tensor group in a file; ``calculate_weight`` rebuilds the adapter
from those tensors (``tlora/``), computes ``W' − W`` in fp32 for the weight it is given and
adds ``strength · (W' − W)``: linear in strength, negative values allowed.
"""

from __future__ import annotations

import logging

import torch
from comfy import weight_adapter
from comfy.weight_adapter.base import WeightAdapterBase

from ..tlora.format import build_adapter, soda_group, tlora_group

log = logging.getLogger("comfyui-tlora")


class _TensorGroupAdapter(WeightAdapterBase):
    """One module's adapter tensors (``suffix → tensor``), rebuilt per weight shape and device."""

    name = "tlora"

    def __init__(self, loaded_keys: set[str], weights: dict[str, torch.Tensor]):
        self.loaded_keys = loaded_keys
        self.weights = weights
        self._built: dict[tuple, torch.nn.Module] = {}

    @staticmethod
    def find_group(lora: dict[str, torch.Tensor], x: str) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        group = cls.find_group(lora, x)
        if group is None:
            return None
        keys = {f"{x}.{suffix}" for suffix in group}
        if loaded_keys is not None:
            loaded_keys.update(keys)
        return cls(keys, group)

    def adapter_for(self, weight: torch.Tensor):
        key = (tuple(weight.shape), weight.device)
        if key not in self._built:
            self._built[key] = build_adapter(key[0], self.weights).to(weight.device)
        return self._built[key]

    def prepare(self, adapter, weight: torch.Tensor) -> None:
        """Anything an adapter needs from the weight before merging (SODA: its SVD)."""

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        if strength == 0:
            return weight
        try:
            with torch.no_grad():
                adapter = self.adapter_for(weight)
                self.prepare(adapter, weight)
                delta = adapter.delta_weight(weight).mul_(strength)  # a fresh buffer: scaled in place
                weight += function(delta.to(weight.dtype))
        except (ValueError, RuntimeError) as err:
            log.error("%s: %s not patched: %s", self.name, key, err)
        return weight


class TLoRAWeightAdapter(_TensorGroupAdapter):
    """The TLoRA family (TLoRA, TLoRA*, transform-only, residual-only): ``tlora.*`` keys."""

    name = "tlora"
    find_group = staticmethod(tlora_group)


class SODAWeightAdapter(_TensorGroupAdapter):
    """SODA / SVDiff: ``soda.*`` keys. The SVD is taken of the weight being patched; a weight
    other than the one trained on (another checkpoint, or one already patched by an earlier
    LoRA in a stack) only warns here: Apply TLoRA checks the model's own weights strictly."""

    name = "soda"
    find_group = staticmethod(soda_group)

    def prepare(self, adapter, weight: torch.Tensor) -> None:
        adapter.bind(weight, on_mismatch="warn")


ADAPTERS = (TLoRAWeightAdapter, SODAWeightAdapter)


def register() -> None:
    """Append this pack's adapters to ComfyUI's registry (once)."""
    for cls in ADAPTERS:
        if not any(a.__name__ == cls.__name__ for a in weight_adapter.adapters):
            weight_adapter.adapters.append(cls)
