"""Splitting a layer width into D factors for tensorized (TRM / TR / Kronecker) structures.

Index order everywhere in this package is C-order: a width ``n = n_1·…·n_D`` is viewed as
``(n_1, …, n_D)`` with the first factor most significant, exactly what ``tensor.reshape``
does. Factors are returned in ascending order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# TLoRA's reference factorizations (D = 3), from the paper's code.
TLORA_FACTORS: Mapping[int, tuple[int, ...]] = {
    320: (4, 8, 10),
    640: (8, 8, 10),
    768: (8, 8, 12),
    1280: (8, 10, 16),
    2048: (8, 16, 16),
}


def _splits(n: int, parts: int, smallest: int):
    """Every ascending tuple of ``parts`` integers ≥ ``smallest`` whose product is ``n``."""
    if parts == 1:
        if n >= smallest:
            yield (n,)
        return
    limit = round(n ** (1.0 / parts)) + 1
    for f in range(smallest, limit + 1):
        if n % f == 0:
            for rest in _splits(n // f, parts - 1, f):
                yield (f, *rest)


def factorize(
    n: int, num_factors: int = 3, table: Mapping[int, tuple[int, ...]] | None = TLORA_FACTORS
) -> tuple[int, ...]:
    """Split ``n`` into ``num_factors`` ascending factors with ``prod == n``.

    A width in ``table`` (the reference factorizations, when ``num_factors`` matches) is
    taken from it. Otherwise the split minimising ``Σ n_d²`` is chosen, i.e. the cheapest
    TRM core set; ties go to the lexicographically smallest tuple. Widths with few divisors
    degrade gracefully: a prime ``p`` gives ``(1, …, 1, p)``.
    """
    if n < 1 or num_factors < 1:
        raise ValueError(f"cannot factorize width {n} into {num_factors} factors")
    if table is not None and n in table and len(table[n]) == num_factors:
        return tuple(table[n])
    best = min(_splits(n, num_factors, 1), key=lambda f: (sum(x * x for x in f), f))
    assert math.prod(best) == n
    return best
