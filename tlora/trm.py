"""Tensor-ring matrix (TRM): a dense ``n × n`` matrix stored as D small cores.

Cores ``A^d`` have shape ``[I_d, J_d, R, R]``; with ``n_out = ΠI_d`` and ``n_in = ΠJ_d``

    T[(i_1..i_D), (j_1..j_D)] = tr(A^1[i_1, j_1] · … · A^D[i_D, j_D])

(C-order multi-indices). With R = 1 this is the Kronecker product ``A^1 ⊗ … ⊗ A^D``.
Everything here is stateless; :mod:`tlora.adapters.tlora` holds the cores as parameters.

Paths that never build ``T`` (``n × n``):
- :func:`apply` computes ``x @ Tᵀ`` by contracting the rows of ``x`` with one core at a
  time (cost ≈ ``N·n·(I_D R² + Σ_mid I_d R³ + I_1 R²)``), closing the ring with a single
  contraction over both bonds;
- ``W·T`` for merging is ``apply(W, transpose(cores))``, mode by mode over W's input dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Cores = list[Tensor]


def shape_of(cores: Cores) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix the cores represent."""
    return math.prod(c.shape[0] for c in cores), math.prod(c.shape[1] for c in cores)


def transpose(cores: Cores) -> Cores:
    """Cores of ``Tᵀ``: swap each core's row and column index."""
    return [c.transpose(0, 1) for c in cores]


# The diagonal of G_1 (see identity_cores): sums to 1, and every partial sum of its entries, in
# any order, is 0 or ±2^k, so a contraction that adds up W·d_r over the ranks is exact.
def _first_diagonal(rank: int) -> list[float]:
    if rank == 1:
        return [1.0]
    if rank == 2:
        return [0.5, 0.5]
    return [1.0, 1.0, -1.0] + [0.0] * (rank - 3)


def identity_cores(factors: tuple[int, ...], rank: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Cores:
    """Cores with ``TRM == I`` bit for bit and no dead ranks: ``A^d[i, j] = δ_ij · G_d``.

    The ``R × R`` bonds ``G_d`` are upper triangular: random above the diagonal (N(0, 1/R),
    a fixed ``seed`` makes the init, and so the regularizers' anchor, reproducible), 1 on it,
    except ``G_1``'s diagonal ``d`` (:func:`_first_diagonal`). Every ring path through an entry
    below a diagonal meets an exact 0, so ``tr(G_1 ⋯ G_D) = Σ d_r = 1`` and T, ``W·T`` and
    ``x·Tᵀ`` are exact in any precision and contraction order: step 0 is the base model bit
    for bit. Unlike the reference init (:func:`reference_identity_cores`), the R² slices
    differ, so all ranks train (tests/test_trm.py proves both facts).
    """
    gen = torch.Generator().manual_seed(seed)
    upper = torch.ones(rank, rank).triu(1)
    bonds = [torch.eye(rank) + upper * torch.randn(rank, rank, generator=gen) / math.sqrt(rank) for _ in factors]
    bonds[0].diagonal().copy_(torch.tensor(_first_diagonal(rank)))
    return [(torch.eye(f)[:, :, None, None] * g).to(dtype) for f, g in zip(factors, bonds, strict=True)]


def reference_identity_cores(factors: tuple[int, ...], rank: int, dtype: torch.dtype = torch.float32) -> Cores:
    """The paper's init: every ``R × R`` slice is ``δ_ij · J / R`` (J all-ones); ``T = I``.

    Every slice gets the same gradient, so a rank-R TRM trains like the rank-1 Kronecker
    transform. Kept to document (and test) that flaw; use :func:`identity_cores`.
    """
    ones = torch.ones(rank, rank, dtype=dtype) / rank
    return [torch.eye(f, dtype=dtype)[:, :, None, None] * ones for f in factors]


def materialize(cores: Cores) -> Tensor:
    """The dense ``[ΠI_d, ΠJ_d]`` matrix. The first D−1 cores are chained over their (row,
    column) pairs (``(n_in/J_D)²·R²`` numbers: small), then one contraction with the last core
    closes the ring and writes T: ≈ ``n_out·n_in·R²`` MACs, no intermediate larger than T."""
    if len(cores) == 1:
        return torch.einsum("ijaa->ij", cores[0])
    acc = cores[0]
    for core in cores[1:-1]:
        i, j, a, _ = acc.shape
        k, m, _, c = core.shape
        acc = torch.einsum("ijab,kmbc->ikjmac", acc, core).reshape(i * k, j * m, a, c)
    last = cores[-1]
    dense = torch.einsum("IJab,ijba->IiJj", acc, last)
    return dense.reshape(acc.shape[0] * last.shape[0], acc.shape[1] * last.shape[1])


def apply(x: Tensor, cores: Cores) -> Tensor:
    """``x @ Tᵀ`` for ``x`` of shape ``[..., n_in]`` without building T.

    Rows stay first and the cores are contracted from the last (least significant) to the
    first, so every step is one (batched) matmul over a contiguous view: the last core maps
    ``j_D → (p, i_D, q)``, each middle core contracts ``(j_d, p)`` next to each other, and the
    first closes the ring over ``(j_1, s, q)`` after the only copy. Cost ≈
    ``N·n·(I_D R² + Σ_mid I_d R³ + I_1 R²)`` MACs with ``N·n·R²``-sized intermediates.
    """
    d = len(cores)
    if d == 1:
        return x @ torch.einsum("ijaa->ij", cores[0]).T
    cols = [c.shape[1] for c in cores]
    rows = [c.shape[0] for c in cores]
    r = cores[0].shape[2]
    lead = x.shape[:-1]
    k = math.prod(lead)
    last = cores[-1].permute(1, 2, 0, 3).reshape(cols[-1], -1)  # [j, (p i q)]
    z = x.reshape(-1, cols[-1]) @ last  # [(K, J_1..J_{D-1}), (p, i_D, q)]
    done = rows[-1]
    for m in range(d - 2, 0, -1):
        lhs = cores[m].permute(2, 0, 1, 3).reshape(r * rows[m], cols[m] * r)  # [(s i), (j p)]
        z = torch.matmul(lhs, z.reshape(-1, cols[m] * r, done * r))  # [(K, J_1..J_{m-1}), (s i_m), (done q)]
        done *= rows[m]
    z = z.reshape(k, cols[0], r, done, r).permute(0, 1, 2, 4, 3).reshape(k, cols[0] * r * r, done)
    first = cores[0].permute(0, 1, 3, 2).reshape(rows[0], cols[0] * r * r)  # [i, (j s q)]
    return torch.matmul(first, z).reshape(*lead, -1)


def apply_to_weight(weight: Tensor, cores: Cores, max_elements: int = 1 << 24) -> Tensor:
    """``W · T`` for ``W`` of shape ``[out, n]`` (any trailing dims flattened into ``n``),
    mode by mode over the input dim: never builds the ``n × n`` T. Rows go in chunks so
    that no intermediate exceeds ``max_elements`` (the contraction holds ``rows·n·R²``)."""
    flat = weight.reshape(weight.shape[0], -1)
    cores_t = transpose(cores)
    rank = cores[0].shape[2]
    rows = max(1, max_elements // (flat.shape[1] * rank * rank))
    if rows >= flat.shape[0]:
        return apply(flat, cores_t).reshape(weight.shape)
    return torch.cat([apply(chunk, cores_t) for chunk in flat.split(rows)]).reshape(weight.shape)


def product_cores(a: Cores, b: Cores) -> Cores:
    """Cores of ``TRM(a) · TRM(b)ᵀ``: ``C^d[i, j] = Σ_l a^d[i, l] ⊗ b^d[j, l]`` (bond R_a·R_b)."""
    out = []
    for ca, cb in zip(a, b, strict=True):
        i, _, ra, _ = ca.shape
        j, _, rb, _ = cb.shape
        out.append(torch.einsum("ilab,jlcd->ijacbd", ca, cb).reshape(i, j, ra * rb, ra * rb))
    return out


def _slice_distance(cores: Cores, anchor: Cores) -> Tensor:
    """``Σ_d Σ_{r,r'} ‖cores^d[:, :, r, r'] − anchor^d[:, :, r, r']‖_F``."""
    return sum(torch.linalg.vector_norm(c - a.to(c), dim=(0, 1)).sum() for c, a in zip(cores, anchor, strict=True))


def identity_regularizer(cores: Cores, anchor: Cores) -> Tensor:
    """Slice-wise distance of the cores from an identity init ``anchor`` (paper's R_I, whose
    anchor is ``I/R``; here the anchor is whichever identity init the cores started from).
    Zero at init. A surrogate: the ring's gauge freedom lets ``T = I`` with R_I > 0."""
    return _slice_distance(cores, anchor)


def orthogonal_regularizer(cores: Cores, anchor: Cores) -> Tensor:
    """Slice-wise distance of ``TTᵀ``'s cores (product rule) from those of the anchor's
    ``TTᵀ = I`` (paper's R_O). Zero at init."""
    return _slice_distance(product_cores(cores, cores), product_cores(anchor, anchor))
