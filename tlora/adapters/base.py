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
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FILE_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_FILE_ORDER = 16  # most cores (or rotation factors) one module's group may have


def layer_widths(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(out, in)`` of a flattened layer weight: ``in`` is ``in_channels·kh·kw`` for a conv."""
    return int(weight_shape[0]), math.prod(int(s) for s in weight_shape[1:])


def expect(condition: bool, problem: str) -> None:
    """Raise ValueError(``problem``) unless ``condition``: one line per file-format rule."""
    if not condition:
        raise ValueError(problem)


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
    :meth:`forward` with something cheaper than merging. Each class also owns its part of the
    file format (docs/format.md): the keys of one module's group, written by
    :meth:`file_tensors` and read back by :meth:`from_file_tensors`, and it builds its own
    training instance (:meth:`create_train`).
    """

    method: str = "base"
    # -- file keys: ``<module>.<file_prefix><name>``; ``file_mark`` is present once per module
    file_prefix: ClassVar[str] = ""
    file_mark: ClassVar[str] = ""
    file_fixed: ClassVar[tuple[str, ...]] = ()  # other single keys, after the prefix
    file_indexed: ClassVar[tuple[str, ...]] = ()  # keys ``<name>.0``, ``<name>.1``, … after the prefix
    # the valid groups: each a set of fixed and indexed names, besides the mark (tlora.validate.layout_of)
    file_layouts: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # -- training hooks
    bypassed: bool = False  # when set, the attached layer runs as the frozen base (DCO's reference pass)

    def __init__(self, weight_shape: tuple[int, ...]):
        super().__init__()
        if len(weight_shape) not in (2, 4):
            raise ValueError(f"expected a Linear [out, in] or Conv2d [out, in, kh, kw] weight, got {weight_shape}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.out_features = self.weight_shape[0]
        self.in_features = math.prod(self.weight_shape[1:])

    @classmethod
    def create_train(cls, method: str, weight: Tensor, *, seed: int = 0, **options) -> Adapter:
        """A fresh adapter of the named ``method`` for the layer weight ``weight``, on its device.
        ``options``: the training options the method reads (ranks, regularizer); others are ignored."""
        raise NotImplementedError

    def merged_weight(self, weight: Tensor) -> Tensor:
        """``W'`` in fp32, same shape as ``weight``."""
        raise NotImplementedError

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``W' − W`` in fp32 (what a strength multiplies when patching a model)."""
        return self.merged_weight(weight) - weight.float()

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, conv: ConvArgs | None = None) -> Tensor:
        """The adapted layer's output for input ``x`` (training path). Default: merge."""
        return base_forward(x, self.merged_weight(weight), bias, conv)

    def bypass(
        self,
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        weight: Callable[[], Tensor],
        conv: ConvArgs | None = None,
        strength: float = 1.0,
    ) -> Tensor:
        """The layer at ``W + m·(W' − W)`` without merging (``m``: ``strength``), through the
        frozen layer's own forward ``base`` (any dtype, quantized too). Default: through the
        weight change, ``base(x) + m·(W' − W)·x``, which reads the base weight (``weight()``);
        subclasses with an activation form override it for Linear layers."""
        delta = self.delta_weight(weight()).mul_(strength)
        y = base(x)
        return y + base_forward(x, delta.to(x.dtype), None, conv).to(y.dtype)

    # -- the file format -------------------------------------------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        """``key → tensor`` of this module's group (keys without the module prefix)."""
        return {f"{self.file_prefix}{k}": v.detach().clone() for k, v in self.state_dict().items()}

    @classmethod
    def from_file_tensors(cls, weight_shape: tuple[int, ...], group: Mapping[str, Tensor]) -> Adapter:
        """Rebuild an adapter from what :meth:`file_tensors` wrote. Raises ValueError when the
        tensors are incomplete or do not fit ``weight_shape``."""
        raise NotImplementedError

    @classmethod
    def check_file_tensors(cls, group: Mapping[str, Any], weight_shape: tuple[int, ...] | None = None) -> None:
        """Raise ValueError unless ``group`` (one module's keys, already one of ``file_layouts``;
        tensors or header entries: only ``shape`` and ``dtype`` are read) has this class's dtypes and
        shapes, consistent with each other, ranks ≥ 1 and bounded by the layer's width, and, given
        ``weight_shape``, made for that layer. Nothing is allocated: it runs before building."""
        raise NotImplementedError

    @classmethod
    def file_shapes(cls, group: Mapping[str, Any], integer: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
        """``name → shape`` of a group (prefix dropped), refusing a dtype other than floating point
        (int64 for the names in ``integer``)."""
        shapes = {}
        for key, value in group.items():
            name = key[len(cls.file_prefix) :] if key.startswith(cls.file_prefix) else key
            allowed = (torch.int64,) if name in integer else FILE_FLOAT_DTYPES
            expect(value.dtype in allowed, f"{key} has dtype {value.dtype}, expected one of {list(allowed)}")
            shapes[name] = tuple(int(s) for s in value.shape)
        return shapes

    @classmethod
    def file_group(cls, tensors: Mapping[str, Tensor], module: str) -> dict[str, Tensor] | None:
        """``module``'s group of this class in a file's tensors, or None; found by probing the
        declared keys: constant time in the file's size, as a loader calling it per model key needs."""
        if f"{module}.{cls.file_mark}" not in tensors:
            return None
        names = [cls.file_mark, *(cls.file_prefix + name for name in cls.file_fixed)]
        group = {name: tensors[f"{module}.{name}"] for name in names if f"{module}.{name}" in tensors}
        for name in cls.file_indexed:
            d = 0
            while f"{module}.{cls.file_prefix}{name}.{d}" in tensors:
                group[f"{cls.file_prefix}{name}.{d}"] = tensors[f"{module}.{cls.file_prefix}{name}.{d}"]
                d += 1
        return group

    @classmethod
    def unprefixed(cls, group: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A group's tensors under their ``state_dict`` names (the prefix dropped)."""
        n = len(cls.file_prefix)
        return {k[n:]: v for k, v in group.items() if k.startswith(cls.file_prefix)}

    # -- training hooks --------------------------------------------------------------------
    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer: ``"adamw"`` (the default), or SODA's ``"spectral"``,
        ``"stiefel"``, ``"cayley"`` (see :func:`tlora.stiefel.soda_optimizers`)."""
        return {"adamw": list(self.parameters())}

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
