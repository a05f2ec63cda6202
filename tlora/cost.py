"""Which way to run an adapted Linear in training: a cost model over shapes and token count.

Three paths give the same output ``y = x (W·T + sΔ)ᵀ + b``:

- ``merged``: build ``W' = W·T + sΔ`` (``W·T`` mode by mode, or via a dense T, whichever is
  cheaper) and run one matmul. Independent of the token count, but the frozen W now sits
  inside the autograd graph, so backward pays a full weight gradient ``N·in·out``.
- ``transform``: build the dense ``T`` (``in × in``) and apply it to the activations, then W.
- ``contract``: contract the activations with T's cores one by one, never forming T.

Both activation paths add ``Δx`` through its low-rank factors (``N·(in+out)·r``). Costs are
in multiply-accumulates (MACs) plus a memory term: the core contraction is memory-bound (each
step writes ``N·in·R²`` elements for few MACs each), and on a 2-core CPU one element moved
costs about as much time as 50 MACs of a large matmul (fitted on the shapes of
``bench/layer_speed.py``: 43-54 across them; see bench/RESULTS.md). Trainable parts count 3×
(forward, and the two backward products); the frozen base matmul is common to every path and
left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# MAC-equivalents per element moved by a copy or elementwise op, and per launched kernel.
MEMORY_COST = 50.0
KERNEL_COST = 2.0e5
# A dense T (in × in) is never built above this many elements (64 MiB in fp32): merging a
# 10240-wide feed-forward weight goes mode by mode instead.
MAX_DENSE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LayerShape:
    """What the cost of an adapted Linear depends on.

    ``factors``: the transform's input factors (empty: no transform); ``transform_rank``: its
    ring rank; ``residual_rank``: the residual's effective rank (R² for a TR ring, r for LoRA,
    0 for none).
    """

    in_features: int
    out_features: int
    factors: tuple[int, ...] = ()
    transform_rank: int = 0
    residual_rank: int = 0


def contraction_macs(rows: int, shape: LayerShape) -> int:
    """Multiply-accumulates of applying T to ``rows`` vectors through the cores."""
    n, r, f = shape.in_features, shape.transform_rank, shape.factors
    if not f:
        return 0
    if len(f) == 1:
        return rows * n * n
    return rows * n * ((f[0] + f[-1]) * r * r + sum(f[1:-1]) * r**3)


def contraction_cost(rows: int, shape: LayerShape) -> float:
    """Applying T to ``rows`` vectors through the cores (:func:`tlora.trm.apply`)."""
    n, r, f = shape.in_features, shape.transform_rank, shape.factors
    if not f:
        return 0.0
    moved = rows * n * r * r * (len(f) + 1) if len(f) > 1 else 0
    return contraction_macs(rows, shape) + MEMORY_COST * moved + KERNEL_COST * 2 * len(f)


def materialize_cost(shape: LayerShape) -> float:
    """Building the dense ``in × in`` T from its cores (:func:`tlora.trm.materialize`): the
    ring is closed by one contraction writing T, ≈ ``in²·R²`` MACs and two passes over T (the
    chain of the other cores is small)."""
    n, r, f = shape.in_features, shape.transform_rank, shape.factors
    if not f:
        return 0.0
    return n * n * r * r + MEMORY_COST * 2 * n * n + KERNEL_COST * len(f)


def merge_macs(shape: LayerShape) -> int:
    """Multiply-accumulates of merging ``W' = W·T + s·Δ`` by the cheaper route for ``W·T``
    (mode by mode, or a dense T then one matmul), ``Δ`` from its rank-``residual_rank``
    factors: the arithmetic a merge cannot avoid, with no memory traffic counted."""
    n, m, r, f = shape.in_features, shape.out_features, shape.transform_rank, shape.factors
    residual = m * n * shape.residual_rank
    if not f:
        return residual
    dense = n * n * r * r + m * n * n
    return residual + min(dense, contraction_macs(m, shape))


def dense_merge_is_cheaper(shape: LayerShape) -> bool:
    """Whether ``W·T`` is cheaper through a dense T than mode by mode (and T may be built)."""
    n, m = shape.in_features, shape.out_features
    if n * n > MAX_DENSE_ELEMENTS:
        return False
    return materialize_cost(shape) + m * n * n < contraction_cost(m, shape)


def path_costs(tokens: int, shape: LayerShape) -> dict[str, float]:
    """Estimated forward+backward cost (beyond the shared frozen matmuls) of each path."""
    n, m, rr = shape.in_features, shape.out_features, shape.residual_rank
    residual_act = 3 * (tokens * (n + m) * rr + 2 * KERNEL_COST) + 2 * MEMORY_COST * tokens * m if rr else 0.0
    weight_t = 0.0
    if shape.factors:
        dense = dense_merge_is_cheaper(shape)
        weight_t = materialize_cost(shape) + m * n * n if dense else contraction_cost(m, shape)
    merged = 3 * (weight_t + m * n * (rr + MEMORY_COST) + KERNEL_COST) + tokens * n * m
    costs = {"merged": merged, "contract": 3 * contraction_cost(tokens, shape) + residual_act}
    if shape.factors and n * n <= MAX_DENSE_ELEMENTS:
        transform_act = tokens * n * (n + MEMORY_COST)
        costs["transform"] = 3 * (materialize_cost(shape) + transform_act) + residual_act
    return costs


def choose_path(tokens: int, shape: LayerShape) -> str:
    """The cheapest path for ``tokens`` input rows (see :func:`path_costs`)."""
    costs = path_costs(tokens, shape)
    return min(costs, key=costs.__getitem__)


def tokens_of(numel: int, in_features: int) -> int:
    """Rows of a ``[..., in]`` activation with ``numel`` elements."""
    return max(1, math.ceil(numel / in_features))
