"""Build the factors of many same-shaped layers in one batched pass per forward.

On a GPU an adapted layer's own arithmetic is tiny, so a training step is bound by launching
its many small ops (ring contractions for T and Δ, mode-wise rotations: tens of kernels forward
and backward per layer, against a LoRA's 5). Inside :func:`prepared`, Linear layers of one
shape and config get their factors from one batched build per group, and each layer runs a
LoRA's op count or fewer:

- TLoRA family: ``F.linear(x + x·Eᵀ, W, b) + (x·downᵀ)·(s·up)ᵀ``, ``E = T − I``;
- SODA family: ``F.linear(F.linear(x + x·(O − I), Vh)·ReLU(σ + δ), U, b)``, ``O = Q_1⊗…⊗Q_k``
  (the activations path of :class:`~tlora.adapters.soda.SODA` with a dense O).

A group's parameters enter its build as one stacked autograd leaf per parameter name, whose
gradient is handed back to the layers' parameters as views of one tensor (:func:`gathered`):
no per-parameter op in the backward. The factors are stored transposed (``x @ Eᵀ`` needs no
transpose per layer).

``E`` is dense (``in × in``) for every prepared transform or rotation, so layers wider than
:data:`tlora.cost.MAX_DENSE_ELEMENTS` keep their own path. Under autocast the factors are built
in fp32 and kept in the autocast dtype: small entries keep their relative precision, where a
half-precision ``T`` would round ``1 + ε`` on its diagonal back to 1.

A group's build is a pure function of its stacked leaves (``_tlora_factors``,
``_soda_factors``), which ``prepared(..., compile=True)`` runs through ``torch.compile``: its
tens of small ops per group, forward and backward, fused into a few kernels (the leaves and
their gradients' hand-out stay outside the compiled graph).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from . import cost, trm
from .adapters.base import Adapter
from .adapters.soda import SODA
from .adapters.tlora import TLoRA
from .stiefel import cayley

Factors = tuple[Tensor | None, ...]
log = logging.getLogger("comfyui-tlora")


def group_key(adapter: Adapter) -> tuple:
    """Adapters with equal keys have parameters of equal shapes (they stack) and run the same
    forward."""
    params = tuple((name, tuple(p.shape), p.dtype, p.device, p.requires_grad) for name, p in adapter.named_parameters())
    return type(adapter), adapter.weight_shape, getattr(adapter, "scale", None), params


def preparable(adapter: Adapter) -> bool:
    """Linear TLoRA and bound SODA adapters whose dense ``E`` (if any) is small enough."""
    if len(adapter.weight_shape) != 2:
        return False
    if isinstance(adapter, TLoRA):
        return not adapter.config.transform_rank or adapter.in_features**2 <= cost.MAX_DENSE_ELEMENTS
    if isinstance(adapter, SODA):
        bound = adapter.Vh.numel() > 0
        return bound and (not adapter.factors or adapter.in_features**2 <= cost.MAX_DENSE_ELEMENTS)
    return False


def gathered(params: list[Tensor]) -> Tensor:
    """``torch.stack(params)`` as a new autograd leaf ``[G, …]``. Its gradient is handed to the
    params once accumulated: as views of it where a param holds no gradient yet, added to the
    gradients they hold otherwise. One op forward and two backward, whatever G (stacking
    inside the graph costs one op per param in the backward)."""
    with torch.no_grad():
        stacked = torch.stack(params)
    if torch.is_grad_enabled() and params[0].requires_grad:
        stacked.requires_grad_()
        stacked.register_post_accumulate_grad_hook(functools.partial(_hand_out_grad, params))
    return stacked


def _hand_out_grad(params: list[Tensor], stacked: Tensor) -> None:
    grads = stacked.grad.unbind(0)
    stacked.grad = None
    if all(p.grad is None for p in params):
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
    elif all(p.grad is not None for p in params):
        torch._foreach_add_([p.grad for p in params], grads)
    else:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone() if p.grad is None else p.grad.add_(grad)


def _stacked(members: list[Adapter], name: str) -> Tensor:
    return gathered([m.get_parameter(name) for m in members])


def _ring_chain(cores: list[Tensor]) -> Tensor:
    """``[G, n_1, a, Πn_{d>1}, b]``: the products ``core^1[k_1] ⋯ core^D[k_D]`` (``[a, b]``
    each, as :func:`tlora.tr.chain`) of stacked cores ``[G, *k_d, R, R]`` (``n_d = Πk_d``).
    Every step is one batched matmul; the first core is used as stored, the running product is
    never permuted."""
    g, a, b = cores[0].shape[0], cores[0].shape[-2], cores[0].shape[-1]
    acc, rest = cores[0].reshape(g, -1, b), 1
    for core in cores[1:]:
        c = core.shape[-1]
        acc = torch.bmm(acc, core.movedim(-2, 1).reshape(g, b, -1)).view(g, -1, c)
        rest, b = rest * math.prod(core.shape[1:-2]), c
    return acc.view(g, -1, a, rest, b)


def _minus_identity(dense: Tensor, shape: tuple[int, ...], order: tuple[int, ...]) -> Tensor:
    """``dense.view(G, *shape).permute(0, *order) − I`` as ``[G, n, n]``, written in one pass
    (the identity, first operand, sets the output's memory order)."""
    n = math.isqrt(math.prod(shape))
    permuted = dense.view(dense.shape[0], *shape).permute(0, *(d + 1 for d in order))
    minus_eye = -torch.eye(n, device=dense.device, dtype=dense.dtype).view(1, *permuted.shape[1:])
    return torch.add(minus_eye, permuted).view(dense.shape[0], n, n)


def _transform_excess_t(cores: list[Tensor]) -> Tensor:
    """``Tᵀ − I`` ``[G, n, n]`` from stacked TRM cores ``[G, I_d, J_d, R, R]`` (as
    :func:`tlora.trm.materialize`, batched): the first D−1 cores chained over their (row,
    column) pairs, then one matmul over both bonds with the last core."""
    g, depth = cores[0].shape[0], len(cores)
    if depth == 1:
        dense = torch.einsum("gijaa->gij", cores[0])
        return _minus_identity(dense, tuple(cores[0].shape[1:3]), (1, 0))
    acc = _ring_chain(cores[:-1])  # [G, (i_1 j_1), a, (i_2 j_2 …), c]
    _, _, a, _, c = acc.shape
    last = cores[-1].reshape(g, -1, c * a)  # [G, (i_D j_D), (c a)]
    dense = torch.bmm(last, acc.permute(0, 4, 2, 1, 3).reshape(g, c * a, -1))  # [G, (i_D j_D), (i_1 j_1 …)]
    sizes = [k for core in (cores[-1], *cores[:-1]) for k in core.shape[1:3]]  # i_D, j_D, i_1, j_1, …
    rows, cols = range(2, 2 * depth, 2), range(3, 2 * depth, 2)
    return _minus_identity(dense, tuple(sizes), (*cols, 1, *rows, 0))  # (j_1 … j_D, i_1 … i_D)


def _tlora_leaves(members: list[TLoRA]) -> tuple[list[Tensor], list[Tensor], list[Tensor], bool]:
    """A TLoRA group's stacked leaves (:func:`gathered`): the transform cores ``[G, I_d, I_d,
    R, R]``; the residual's out-cores then in-cores ``[G, …]``, or for square layers (equal
    factors on both sides) each depth's out- and in-cores in one ``[2G, …]``; ``[up, down]``
    of a plain LoRA (else empty); whether the layers are square."""
    first = members[0]
    transform = [_stacked(members, f"transform.{d}") for d in range(len(first.transform))]
    depth, square = len(first.residual_out), first.out_factors == first.in_factors
    if square:
        residual = [
            gathered([*(m.residual_out[d] for m in members), *(m.residual_in[d] for m in members)])
            for d in range(depth)
        ]
    else:
        residual = [_stacked(members, f"{side}.{d}") for side in ("residual_out", "residual_in") for d in range(depth)]
    lora = [_stacked(members, name) for name in ("lora_up", "lora_down")] if first.lora_up is not None else []
    return transform, residual, lora, square


def _tlora_factors(
    transform: list[Tensor], residual: list[Tensor], lora: list[Tensor], square: bool, scale: float
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(Tᵀ − I [G, in, in] | None, downᵀ [G, in, r] | None, (s·up)ᵀ [G, r, out] | None)``
    from :func:`_tlora_leaves`. The residual's chains ``P`` (out-cores) and ``Q`` (in-cores),
    as :func:`_ring_chain` gives them, come from one batched chain for square layers."""
    excess_t = down_t = up_t = None
    if transform:
        excess_t = _transform_excess_t(transform)
    if residual:
        if square:
            p, q = _ring_chain(residual).chunk(2)
        else:
            half = len(residual) // 2
            p, q = _ring_chain(residual[:half]), _ring_chain(residual[half:])
        g, _, r, _, _ = p.shape
        up_t = p.permute(0, 2, 4, 1, 3).reshape(g, r * r, -1)  # up[o, (a b)] = P[o][a, b]
        down_t = q.permute(0, 1, 3, 4, 2).reshape(g, -1, r * r)  # down[(a b), i] = Q[i][b, a]
    elif lora:
        up_t, down_t = lora[0].mT, lora[1].mT
    if up_t is not None and scale != 1:
        up_t = up_t * scale
    return excess_t, down_t, up_t


def _kron(factors: list[Tensor]) -> Tensor:
    """``F_1⊗…⊗F_k`` ``[G, n, n]`` of stacked ``[G, k_d, k_d]`` (C-order: F_1 most significant)."""
    acc = factors[0]
    for f in factors[1:]:
        g, a, b = acc.shape
        _, c, d = f.shape
        acc = (acc.view(g, a, 1, b, 1) * f.view(g, 1, c, 1, d)).view(g, a * c, b * d)
    return acc


def _soda_leaves(members: list[SODA]) -> tuple[Tensor, Tensor, list[Tensor], bool]:
    """A SODA group's ``σ`` ``[G, r]`` (frozen), stacked leaves ``δ`` ``[G, r]`` and rotation
    factors ``Q_d`` or Cayley generators ``[G, k_d, k_d]`` (empty for SVDiff), and whether they
    are generators."""
    first = members[0]
    kind = "cayley" if first.config.rotation == "cayley" else "rotation"
    rotations = [_stacked(members, f"{kind}.{d}") for d in range(len(first.factors))]
    return torch.stack([m.sigma for m in members]), _stacked(members, "delta"), rotations, kind == "cayley"


def _soda_factors(
    sigma: Tensor, delta: Tensor, rotations: list[Tensor], generators: bool
) -> tuple[Tensor | None, Tensor]:
    """``(O − I [G, in, in] | None, ReLU(σ + δ) [G, r])`` from :func:`_soda_leaves`."""
    spectrum = torch.relu(sigma + delta)
    if not rotations:
        return None, spectrum
    dense = _kron([cayley(a) for a in rotations] if generators else rotations)  # O: u = x·O (see SODA.forward)
    return dense - torch.eye(dense.shape[-1], device=dense.device, dtype=dense.dtype), spectrum


def _autocast_off(device: torch.device):
    available = getattr(torch.amp, "is_autocast_available", lambda kind: True)(device.type)
    return torch.autocast(device.type, enabled=False) if available else contextlib.nullcontext()


_compiled: dict[Callable, Callable] = {}  # torch.compile(fn, dynamic=False) per build function
_compile_failed = False


def _build(fn: Callable[..., Factors], args: tuple, compile: bool) -> Factors:
    """``fn(*args)``, through ``torch.compile`` when ``compile``: one compiled callable per
    build function (recompiled, within dynamo's limit, per shape and config it meets). If a
    compiled call fails (no C++ compiler, no triton…), one warning is logged and every build
    runs eagerly from then on; an error that eager also raises propagates."""
    global _compile_failed
    if not compile or _compile_failed:
        return fn(*args)
    try:
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn, dynamic=False)
        return _compiled[fn](*args)
    except Exception as error:  # any compiler failure: training goes on eagerly
        _compile_failed = True
        log.warning("torch.compile of the adapters' factor build failed; building them eagerly: %s", error)
        return fn(*args)


def build_group(members: list[Adapter], dtype: torch.dtype | None, compile: bool = False) -> list[Factors]:
    """Each member's prepared factors (see :meth:`TLoRA._prepared_forward`,
    :meth:`SODA._prepared_forward`), built in fp32 (through ``torch.compile`` when ``compile``)
    and kept in ``dtype`` (fp32 when None)."""
    first = members[0]
    if isinstance(first, TLoRA):
        fn, args = _tlora_factors, (*_tlora_leaves(members), first.scale)
    else:
        fn, args = _soda_factors, _soda_leaves(members)
    with _autocast_off(first._device()):
        factors = _build(fn, args, compile)
    columns = [[None] * len(members) if f is None else (f if dtype is None else f.to(dtype)).unbind(0) for f in factors]
    return list(zip(*columns, strict=True))


@contextlib.contextmanager
def prepared(adapters: Iterable[Adapter], dtype: torch.dtype | None = None, compile: bool = False) -> Iterator[None]:
    """Within the block, preparable adapters (:func:`preparable`) run on factors built per group
    of same-shaped layers; ``dtype``: the autocast dtype, if any; ``compile``: build them
    through ``torch.compile`` (:func:`_build`). Build inside the autograd graph of the forward
    that uses them (once per forward)."""
    groups: dict[tuple, list[Adapter]] = defaultdict(list)
    for adapter in adapters:
        if preparable(adapter):
            groups[group_key(adapter)].append(adapter)
    try:
        for members in groups.values():
            for member, factors in zip(members, build_group(members, dtype, compile), strict=True):
                member.prepared = factors
        yield
    finally:
        for members in groups.values():
            for member in members:
                member.prepared = None


def regularizer(adapters: Iterable[Adapter]) -> Tensor | None:
    """The sum of the adapters' active regularizers (None when none is on), one vmapped pass per
    group of same-shaped TLoRA layers with the same regularizer."""
    groups: dict[tuple, list[TLoRA]] = defaultdict(list)
    others = []
    for adapter in adapters:
        if isinstance(adapter, TLoRA) and adapter.has_regularizer:
            cfg = adapter.config
            groups[(group_key(adapter), cfg.regularizer, cfg.regularizer_weight)].append(adapter)
        elif adapter.has_regularizer:
            others.append(adapter.regularizer())
    for (_, kind, weight), members in groups.items():
        fn = trm.identity_regularizer if kind == "identity" else trm.orthogonal_regularizer
        depth = len(members[0].transform)
        cores = [_stacked(members, f"transform.{d}") for d in range(depth)]
        anchors = [torch.stack([m._anchor[d] for m in members]).to(cores[d]) for d in range(depth)]
        others.append(weight * torch.func.vmap(fn)(cores, anchors).sum())
    return sum(others[1:], others[0]) if others else None
