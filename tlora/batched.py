"""Build the factors of many same-shaped TLoRA layers in one batched pass per forward.

On a GPU a TLoRA layer's own arithmetic is tiny, so a training step is bound by launching its
many small ops (ring contractions for T and Δ, about 40 kernels forward and backward per
layer, against a LoRA's 5). Inside :func:`prepared`, Linear layers of one shape and config
get ``E = T − I`` and the residual factors from one vmapped build per group, and each layer
runs ``F.linear(x + x·Eᵀ, W) + (x·downᵀ)·(s·up)ᵀ``: a LoRA's op count plus two.

``E`` is dense (``in × in``) for every prepared layer, so layers wider than
:data:`tlora.cost.MAX_DENSE_ELEMENTS` keep their own path. Under autocast ``E`` is built in
fp32 and kept in the autocast dtype: small entries keep their relative precision, where a
half-precision ``T`` would round ``1 + ε`` on its diagonal back to 1.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from . import cost, tr, trm
from .adapters.base import Adapter
from .adapters.tlora import TLoRA


def group_key(adapter: TLoRA) -> tuple:
    """Adapters with equal keys have parameters of equal shapes (they stack)."""
    params = tuple((name, tuple(p.shape), p.dtype, p.device) for name, p in adapter.named_parameters())
    return adapter.weight_shape, adapter.scale, params


def preparable(adapter: Adapter) -> bool:
    return (
        isinstance(adapter, TLoRA)
        and len(adapter.weight_shape) == 2
        and adapter.in_features**2 <= cost.MAX_DENSE_ELEMENTS
    )


def _stacked(members: list[TLoRA], names: Iterable[str]) -> list[Tensor]:
    """Each named parameter of all members, stacked on a new leading dim."""
    return [torch.stack([m.get_parameter(name) for m in members]) for name in names]


def build_group(members: list[TLoRA], dtype: torch.dtype | None) -> list[tuple[Tensor | None, ...]]:
    """``(E [in, in] | None, up·s [out, r] | None, down [r, in] | None)`` per member, in
    ``dtype`` (fp32 when None)."""
    first = members[0]
    device = first._device()
    count = len(members)
    columns: list[tuple[Tensor, ...] | list[None]] = []
    with torch.autocast(device.type, enabled=False):
        if len(first.transform):
            cores = _stacked(members, [f"transform.{d}" for d in range(len(first.transform))])
            dense = torch.func.vmap(trm.materialize)(cores)
            eye = torch.eye(first.in_features, device=device, dtype=dense.dtype)
            columns.append((dense - eye).to(dtype or dense.dtype).unbind(0))
        else:
            columns.append([None] * count)
        if len(first.residual_out):
            outs = _stacked(members, [f"residual_out.{d}" for d in range(len(first.residual_out))])
            ins = _stacked(members, [f"residual_in.{d}" for d in range(len(first.residual_in))])
            up, down = torch.func.vmap(tr.low_rank_factors)(outs, ins)
        elif first.lora_up is not None:
            up, down = _stacked(members, ["lora_up", "lora_down"])
        else:
            up = down = None
        if up is None:
            columns += [[None] * count, [None] * count]
        else:
            columns.append((up * first.scale).to(dtype or up.dtype).unbind(0))
            columns.append(down.to(dtype or down.dtype).unbind(0))
    return list(zip(*columns, strict=True))


@contextlib.contextmanager
def prepared(adapters: Iterable[Adapter], dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within the block, preparable TLoRA adapters (Linear, ``in² ≤ MAX_DENSE_ELEMENTS``) run
    on factors built per group of same-shaped layers; ``dtype``: the autocast dtype, if any.
    Build inside the autograd graph of the forward that uses them (once per forward)."""
    groups: dict[tuple, list[TLoRA]] = defaultdict(list)
    for adapter in adapters:
        if preparable(adapter):
            groups[group_key(adapter)].append(adapter)
    try:
        for members in groups.values():
            for member, factors in zip(members, build_group(members, dtype), strict=True):
                member.prepared = factors
        yield
    finally:
        for members in groups.values():
            for member in members:
                member.prepared = None
