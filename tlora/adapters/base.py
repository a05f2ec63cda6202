"""The interface every adapter implements: one frozen layer weight in, its adapted weight out.

Weights are stored PyTorch-style: Linear ``[out, in]``, Conv2d ``[out, in, kh, kw]``. An
adapter acts on the *flattened* weight ``[out, in·kh·kw]``: for a conv, the input-side
transform T mixes the whole receptive field (input channels × kernel taps, C-order), exactly
as a Linear on im2col patches would.

Adapter math runs in fp32 whatever the base weight's dtype; only the frozen layer's own
matmul runs in the input's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvArgs(NamedTuple):
    """The non-weight arguments of a Conv2d call."""

    stride: tuple[int, int] | int = 1
    padding: tuple[int, int] | int | str = 0
    dilation: tuple[int, int] | int = 1
    groups: int = 1

    @classmethod
    def of(cls, module: nn.Conv2d) -> ConvArgs:
        if module.padding_mode != "zeros" or module.groups != 1:
            raise ValueError(
                f"only zero-padded, ungrouped Conv2d layers can be adapted "
                f"(got padding_mode={module.padding_mode!r}, groups={module.groups})"
            )
        return cls(module.stride, module.padding, module.dilation, module.groups)


def base_forward(x: Tensor, weight: Tensor, bias: Tensor | None, conv: ConvArgs | None) -> Tensor:
    """The frozen layer's own op (Linear or Conv2d) in ``x``'s dtype."""
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if conv is None:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, *conv)


class Adapter(nn.Module):
    """Adapts one layer weight of shape ``weight_shape``.

    Subclasses implement :meth:`merged_weight` (the exact ``W'``) and may override
    :meth:`forward` with something cheaper than merging. Parameter names (``state_dict``
    keys) are stable: the file format is built on them.
    """

    method: str = "base"

    def __init__(self, weight_shape: tuple[int, ...]):
        super().__init__()
        if len(weight_shape) not in (2, 4):
            raise ValueError(f"expected a Linear [out, in] or Conv2d [out, in, kh, kw] weight, got {weight_shape}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.out_features = self.weight_shape[0]
        self.in_features = math.prod(self.weight_shape[1:])

    def merged_weight(self, weight: Tensor) -> Tensor:
        """``W'`` in fp32, same shape as ``weight``."""
        raise NotImplementedError

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``W' − W`` in fp32 (what a strength multiplies when patching a model)."""
        return self.merged_weight(weight) - weight.float()

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, conv: ConvArgs | None = None) -> Tensor:
        """The adapted layer's output for input ``x`` (training path). Default: merge."""
        return base_forward(x, self.merged_weight(weight), bias, conv)

    @property
    def has_regularizer(self) -> bool:
        """Whether :meth:`regularizer` can be non-zero (the trainer skips the others)."""
        return False

    def regularizer(self) -> Tensor:
        """An optional penalty added to the training loss (zero unless configured)."""
        return torch.zeros((), device=self._device())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_weight(self, weight: Tensor) -> None:
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(
                f"{type(self).__name__} was built for a weight of shape {self.weight_shape}, got {tuple(weight.shape)}"
            )
