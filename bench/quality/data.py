"""The benchmark's data: scikit-learn's bundled 8×8 digits, split into a "pretraining" set (the
old classes) and a few-shot "subject" (a held-out class the base model never saw).

Everything but :func:`load_digits_arrays` works on plain arrays, so tests can feed it
synthetic ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DIGITS_MAX = 16.0  # sklearn's digits are integers 0..16


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float in [0, 16], labels [1797] int)`` from scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def to_model_range(images: np.ndarray, max_value: float = DIGITS_MAX) -> Tensor:
    """Images ``[N, H, W]`` in ``[0, max_value]`` → float32 tensor ``[N, 1, H, W]`` in ``[−1, 1]``."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise ValueError(f"expected images [N, H, W], got shape {images.shape}")
    if images.min() < 0 or images.max() > max_value:
        raise ValueError(f"pixel values must lie in [0, {max_value}], got [{images.min()}, {images.max()}]")
    return torch.from_numpy(images / max_value * 2.0 - 1.0).unsqueeze(1)


def to_pixels(images: Tensor) -> np.ndarray:
    """Model-range images ``[N, 1, H, W]`` → uint8 ``[N, H, W]`` (clipped), for pictures."""
    return ((images.detach().squeeze(1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


@dataclass(frozen=True)
class Split:
    """Images ``[N, 1, H, W]`` in [−1, 1] with their labels ``[N]``.

    - ``old_train`` / ``old_test``: the pretraining classes (base model; forgetting);
    - ``new_train``: the few shots of the held-out class (adaptation);
    - ``new_val``: held-out images of the new class for choosing learning rates;
    - ``new_test``: held-out images of the new class for the reported numbers.
    """

    new_class: int
    old_train: tuple[Tensor, Tensor]
    old_test: tuple[Tensor, Tensor]
    new_train: tuple[Tensor, Tensor]
    new_val: tuple[Tensor, Tensor]
    new_test: tuple[Tensor, Tensor]


def split_digits(
    images: np.ndarray,
    labels: np.ndarray,
    new_class: int,
    *,
    shots: int,
    val_count: int,
    old_test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Split labelled images: every class but ``new_class`` into train/test (``old_test_fraction``
    of each class to test), and ``new_class`` into ``shots`` training images, ``val_count``
    validation images and the rest as test. Deterministic in ``seed``; the parts are disjoint."""
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    new_idx = rng.permutation(np.flatnonzero(labels == new_class))
    if len(new_idx) < shots + val_count + 1:
        raise ValueError(
            f"class {new_class} has {len(new_idx)} images: too few for {shots} shots, "
            f"{val_count} validation images and a test set"
        )
    old_train, old_test = [], []
    for c in sorted(set(labels.tolist()) - {new_class}):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = max(1, round(len(idx) * old_test_fraction))
        old_test.append(idx[:cut])
        old_train.append(idx[cut:])
    pixels = to_model_range(images)
    targets = torch.from_numpy(labels.astype(np.int64))

    def take(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        idx = torch.from_numpy(np.sort(idx))
        return pixels[idx], targets[idx]

    return Split(
        new_class=new_class,
        old_train=take(np.concatenate(old_train)),
        old_test=take(np.concatenate(old_test)),
        new_train=take(new_idx[:shots]),
        new_val=take(new_idx[shots : shots + val_count]),
        new_test=take(new_idx[shots + val_count :]),
    )
