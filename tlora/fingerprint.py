"""A stable hash of the base weight an adapter was trained on.

SODA's frozen SVD is recomputed from the base weight at load, so an adapter is only
meaningful on the weights it was trained on. :func:`fingerprint` hashes every value of a
weight (so changing any one value changes it) and is cheap: one pass of BLAKE2b over 2
bytes per value.

Dtype rule: the weight is rounded to fp16 before hashing. An fp32 checkpoint and its fp16
copy (``.half()``, round-to-nearest-even, on any device) therefore share a fingerprint; a
change smaller than fp16's rounding does not register. A bf16 copy rounds differently and
does not match its fp32 original: pass ``on_mismatch="warn"`` to accept it knowingly.
The shape is part of the hash; the device, layout and storage dtype are not.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Literal

import torch
from torch import Tensor

OnMismatch = Literal["raise", "warn", "ignore"]

FINGERPRINT_DTYPE = torch.float16


def fingerprint(weight: Tensor) -> int:
    """A signed 64-bit hash of ``weight``'s shape and fp16-rounded values (never 0)."""
    values = weight.detach().to(FINGERPRINT_DTYPE).cpu().contiguous()
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr(tuple(values.shape)).encode())
    digest.update(values.view(torch.int16).numpy())
    return int.from_bytes(digest.digest(), "little", signed=True) or 1


def check_fingerprint(expected: int, actual: int, on_mismatch: OnMismatch = "raise", what: str = "adapter") -> bool:
    """Whether fingerprint ``actual`` equals ``expected``; on a mismatch raise, warn or stay
    silent. ``expected == 0`` means "not recorded" and always passes."""
    if on_mismatch not in ("raise", "warn", "ignore"):
        raise ValueError(f"on_mismatch must be 'raise', 'warn' or 'ignore', got {on_mismatch!r}")
    if not expected or actual == expected:
        return True
    message = f"{what} was trained on different base weights (fingerprint {expected:#x}, got {actual:#x})"
    if on_mismatch == "raise":
        raise ValueError(message + "; pass on_mismatch='warn' to apply it anyway")
    if on_mismatch == "warn":
        warnings.warn(message, stacklevel=3)
    return False
