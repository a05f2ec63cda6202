"""Plain LoRA, ``W' = W + s·B·A``, on the TLoRA interface (the ``lora`` preset: no transform,
a LoRA residual). Its files use the standard kohya-style keys, so every LoRA loader reads them."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .tlora import TLoRA


class LoRA(TLoRA):
    """``up`` ``[out, r]`` and ``down`` ``[r, in]``; written as ``lora_up.weight``,
    ``lora_down.weight`` and ``alpha = s·r`` (a loader's ``alpha / r`` gives back ``s``)."""

    file_prefix = ""
    file_mark = "lora_up.weight"
    file_fixed = ("lora_down.weight", "alpha")
    file_indexed = ()

    def file_tensors(self) -> dict[str, Tensor]:
        up, down = self.lora_up.detach(), self.lora_down.detach()
        alpha = torch.tensor(self.scale * up.shape[1], dtype=torch.float32)
        return {"lora_up.weight": up.clone(), "lora_down.weight": down.clone(), "alpha": alpha}

    @classmethod
    def from_file_tensors(cls, weight_shape: tuple[int, ...], group: Mapping[str, Tensor]) -> LoRA:
        """Also reads a conv LoRA stored conv-shaped (up ``[out, r, 1, 1]``, down
        ``[r, in, kh, kw]``), as ComfyUI reads it; no ``alpha`` means ``alpha = r``."""
        if "lora_down.weight" not in group:
            raise ValueError("incomplete LoRA tensors: lora_up.weight without lora_down.weight")
        up, down = group["lora_up.weight"].flatten(1), group["lora_down.weight"].flatten(1)
        alpha = float(group["alpha"]) if "alpha" in group else up.shape[1]
        return cls.from_state(weight_shape, {"lora_up": up, "lora_down": down}, alpha / up.shape[1])
