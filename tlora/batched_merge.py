"""Merge many layers' TLoRA adapters with their factors built per group of same-shaped layers.

A layer's merge ``W' − W = W·(T − I) + s·Δ`` is two matmuls once ``E = T − I`` and Δ's factors
exist; building them (ring contractions) is tens of small ops per layer, which on a GPU cost a
kernel launch each. Where the cost model merges a layer through a dense T (:func:`mergeable`),
:class:`GroupedMerge` builds them for up to :data:`BUDGET_BYTES` of a file's
same-shaped layers in one batched pass (:func:`tlora.batched.build_group`) when the first of them
is merged, and hands each layer its factors when the host merges it: one build per chunk of a
group, two matmuls per layer.

This is for devices where launches cost (``GroupedMerge.devices``: CUDA by default). On a CPU an
op costs no launch, and each layer's own merge is faster there (its ``trm.materialize`` beats the
batched chains, built for training's backward: 2-4× on 320-640-wide layers).

The host merges layers one at a time in its own order (and may merge some again, or never), so
the factors built ahead are a cache of at most ``budget`` bytes: taken by the layer they belong
to, the least recently built dropped first when over budget. A layer the batched pass does not
take (a conv, SODA, a transform cheaper mode by mode) merges on its own path.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from . import cost
from .adapters.base import Adapter
from .adapters.tlora import TLoRA
from .batched import Factors, build_group, group_key, preparable

BUDGET_BYTES = 128 * 2**20  # factors built ahead of their layers' merges, at most (per file)

# A member's adapter for a 2-D weight shape; None once the member is gone (it leaves the merge).
Builder = Callable[[tuple[int, int], torch.device], Adapter | None]


def factor_bytes(factors: Factors) -> int:
    return sum(f.numel() * f.element_size() for f in factors if f is not None)


def delta_from_factors(weight: Tensor, factors: Factors) -> Tensor:
    """``W·(T − I) + s·Δ`` ``[out, in]`` in fp32 from ``(Eᵀ, downᵀ, (s·up)ᵀ)``
    (:meth:`~tlora.adapters.tlora.TLoRA._prepared_forward`'s factors; each may be None)."""
    excess_t, down_t, up_t = factors
    flat = weight.reshape(weight.shape[0], -1).float()
    if up_t is None:
        return flat @ excess_t.mT
    if excess_t is None:
        return up_t.mT @ down_t.mT
    return torch.addmm(flat @ excess_t.mT, up_t.mT, down_t.mT)


class GroupedMerge:
    """The members (layers) of one adapter file, each added with a ``signature`` (equal for
    layers whose factors can stack: their file tensors' shapes) and a :data:`Builder`."""

    def __init__(self, budget: int = BUDGET_BYTES, devices: tuple[str, ...] = ("cuda",)):
        self.budget = budget
        self.devices = devices  # device types whose merges go through the batched build
        self.builders: dict[Hashable, tuple[Hashable, Builder]] = {}
        self.by_signature: dict[Hashable, list[Hashable]] = defaultdict(list)
        self.ahead: OrderedDict[Hashable, Factors] = OrderedDict()  # built for layers not merged yet
        self.batched_builds = 0  # batched passes run (a diagnostic)

    def add(self, member: Hashable, signature: Hashable, build: Builder) -> None:
        """Add a layer, or replace a member added before (the file loaded again, or edited)."""
        if member in self.builders:
            self.by_signature[self.builders[member][0]].remove(member)
            self.ahead.pop(member, None)
        self.by_signature[signature].append(member)
        self.builders[member] = (signature, build)

    def delta(self, member: Hashable, weight: Tensor) -> Tensor | None:
        """``W' − W`` in fp32 for ``member``'s layer of weight ``weight``, or None where the
        batched pass does not take it (the caller merges it on its own path)."""
        factors = self.ahead.pop(member, None)
        if factors is None:
            if weight.dim() != 2 or member not in self.builders or weight.device.type not in self.devices:
                return None
            factors = self._build_ahead(member, tuple(weight.shape), weight.device)
            if factors is None:
                return None
        return delta_from_factors(weight, factors)

    def _build_ahead(self, member: Hashable, shape: tuple[int, int], device: torch.device) -> Factors | None:
        """Build ``member``'s factors with those of the same-signature members that follow it
        (up to the budget), keep theirs ahead, and return its own."""
        signature, build = self.builders[member]
        try:
            adapter = build(shape, device)
        except ValueError:  # its own path explains why
            return None
        if adapter is None or not mergeable(adapter):
            return None
        key = group_key(adapter)
        each = _bytes_per_member(adapter)
        peers = self.by_signature[signature]
        start = peers.index(member)
        members, chosen, gone = [adapter], [member], []
        for other in peers[start + 1 :] + peers[:start]:
            if (len(members) + 1) * each > self.budget:
                break
            if other in self.ahead:
                continue
            try:
                candidate = self.builders[other][1](shape, device)
            except ValueError:  # it does not fit this shape (another layer's): it merges on its own
                continue
            if candidate is None:
                gone.append(other)
            elif group_key(candidate) == key:
                members.append(candidate)
                chosen.append(other)
        with torch.no_grad():
            built = build_group(members, None)
        self.batched_builds += 1
        for other in gone:
            del self.builders[other]
            peers.remove(other)
        for other, factors in zip(chosen[1:], built[1:], strict=True):
            self.ahead[other] = factors
        self._trim()
        return built[0]

    def _trim(self) -> None:
        total = sum(factor_bytes(f) for f in self.ahead.values())
        while total > self.budget and self.ahead:
            _, dropped = self.ahead.popitem(last=False)
            total -= factor_bytes(dropped)


def mergeable(adapter: Adapter) -> bool:
    """A Linear TLoRA-family adapter whose ``W·T`` is cheaper through a dense T (the cost model's
    choice for its own merge), or that has no transform."""
    if not isinstance(adapter, TLoRA) or not preparable(adapter):
        return False
    return not adapter.config.transform_rank or cost.dense_merge_is_cheaper(adapter.cost_shape)


def _bytes_per_member(adapter: TLoRA) -> int:
    """The fp32 bytes of one member's factors: ``E`` ``[in, in]`` and Δ's ``[in + out, r]``
    (``r = R²`` for a TR residual of rank R)."""
    cfg = adapter.config
    dense = adapter.in_features**2 if cfg.transform_rank else 0
    rank = 0 if not cfg.has_residual else cfg.residual_rank**2 if cfg.residual == "tr" else cfg.residual_rank
    return 4 * (dense + (adapter.in_features + adapter.out_features) * rank)
