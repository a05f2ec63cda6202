"""Plain LoRA, ``W' = W + s·B·A``, on the TLoRA interface (the ``lora`` preset: no transform,
a LoRA residual). Its files use the standard kohya-style keys, so every LoRA loader reads them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .base import expect
from .tlora import TLoRA, check_widths


class LoRA(TLoRA):
    """``up`` ``[out, r]`` and ``down`` ``[r, in]``; written as ``lora_up.weight``,
    ``lora_down.weight`` and ``alpha = s·r`` (a loader's ``alpha / r`` gives back ``s``)."""

    file_prefix = ""
    file_mark = "lora_up.weight"
    file_fixed = ("lora_down.weight", "alpha")
    file_indexed = ()
    file_layouts = (("lora_down.weight", "alpha"), ("lora_down.weight",))

    @classmethod
    def check_file_tensors(cls, group: Mapping[str, Tensor], weight_shape: tuple[int, ...] | None = None) -> None:
        """``lora_up.weight`` ``[out, r]`` (or ``[out, r, 1, 1]``), ``lora_down.weight`` ``[r, in]``
        (or ``[r, c, kh, kw]``, in = c·kh·kw), ``alpha`` one value; 1 ≤ r ≤ min(out, in)."""
        shapes = cls.file_shapes(group)
        up, down = shapes["lora_up.weight"], shapes["lora_down.weight"]
        expect(
            (len(up) == 2 or (len(up) == 4 and up[2:] == (1, 1))) and len(down) in (2, 4) and up[1] == down[0],
            f"lora_up.weight {list(up)} and lora_down.weight {list(down)} are not [out, r] and [r, in]",
        )
        expect(math.prod(shapes.get("alpha", ())) == 1, f"alpha must be one value, got shape {shapes.get('alpha')}")
        widths_in, widths_out = {"lora_down.weight": math.prod(down[1:])}, {"lora_up.weight": up[0]}
        check_widths(widths_in, widths_out, {"rank": up[1]}, weight_shape)

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
