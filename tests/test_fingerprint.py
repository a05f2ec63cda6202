"""The base-weight fingerprint: stable, sensitive to any value, fp16/fp32 copies alike."""

import warnings

import pytest
import torch

from tlora.fingerprint import check_fingerprint, fingerprint


def weight(seed=0, shape=(64, 48)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_pinned_value():
    """The hash is part of the file format: it must not drift between versions or machines."""
    w = torch.arange(12.0).reshape(3, 4) / 7
    assert fingerprint(w) == 2775801021997638370


def test_deterministic_and_layout_free():
    w = weight()
    assert fingerprint(w) == fingerprint(w.clone())
    assert fingerprint(w) == fingerprint(w.T.contiguous().T)  # a non-contiguous view, same values
    assert fingerprint(w) != fingerprint(weight(seed=1))
    assert -(2**63) <= fingerprint(w) < 2**63 and fingerprint(w) != 0


def test_fp16_and_fp32_copies_match():
    w = weight()
    fp = fingerprint(w)
    assert fingerprint(w.half()) == fp
    assert fingerprint(w.half().float()) == fp
    assert fingerprint(w.double()) == fp
    # documented: a bf16 copy rounds differently and does not match
    assert fingerprint(w.bfloat16()) != fp


@pytest.mark.parametrize("index", [(0, 0), (17, 5), (63, 47)])
def test_one_value_changes_it(index):
    w = weight()
    fp = fingerprint(w)
    changed = w.half().clone()
    changed[index] = torch.nextafter(changed[index], torch.tensor(float("inf"), dtype=torch.float16))  # 1 fp16 ulp
    assert fingerprint(changed) != fp
    changed32 = w.clone()
    changed32[index] += 1e-2
    assert fingerprint(changed32) != fp


def test_shape_is_part_of_it():
    w = weight()
    assert fingerprint(w) != fingerprint(w.reshape(48, 64))
    assert fingerprint(w) != fingerprint(w.reshape(64, 48, 1, 1))


def test_check_policies():
    fp = fingerprint(weight())
    other = fingerprint(weight(seed=1))
    assert check_fingerprint(fp, fp)
    assert check_fingerprint(0, other)  # nothing recorded: passes
    with pytest.raises(ValueError, match="different base weights"):
        check_fingerprint(fp, other)
    with pytest.warns(UserWarning, match="different base weights"):
        assert not check_fingerprint(fp, other, on_mismatch="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_fingerprint(fp, other, on_mismatch="ignore")
    with pytest.raises(ValueError):
        check_fingerprint(fp, other, on_mismatch="maybe")
