"""Width factorization: the reference table and the general rule."""

import math

import pytest

from tlora.factorize import TLORA_FACTORS, factorize


def test_reference_table():
    assert factorize(320) == (4, 8, 10)
    assert factorize(640) == (8, 8, 10)
    assert factorize(768) == (8, 8, 12)
    assert factorize(1280) == (8, 10, 16)
    assert factorize(2048) == (8, 16, 16)


@pytest.mark.parametrize("n", [1, 2, 7, 331, 1024, 3072, 5120, 10240, 2880, 11520, 4 * 320, 77, 1000])
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_any_width(n, d):
    f = factorize(n, d)
    assert len(f) == d and math.prod(f) == n and list(f) == sorted(f)


def test_general_rule_is_balanced():
    assert factorize(1024) == (8, 8, 16)
    assert factorize(4096) == (16, 16, 16)
    assert factorize(331) == (1, 1, 331)  # a prime can only be one factor
    assert factorize(320, table=None) == (5, 8, 8)  # the cheaper split the reference did not use


def test_table_only_applies_to_its_depth():
    assert factorize(320, 2) == (16, 20)
    assert all(len(v) == 3 for v in TLORA_FACTORS.values())


def test_invalid():
    with pytest.raises(ValueError):
        factorize(0)
