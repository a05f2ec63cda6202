"""What the benchmark measures: held-out denoising loss on fixed noise, relative weight error,
the rank of a weight change, a digit classifier that judges samples, and mean ± std."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import NUM_STEPS, prediction_errors


@dataclass(frozen=True)
class EvalSet:
    """Fixed ``(x0, labels, t, ε)`` quadruples: every image at ``K`` stratified timesteps with
    fixed noise, so every model is scored on exactly the same noisy inputs."""

    x0: Tensor
    labels: Tensor
    t: Tensor
    noise: Tensor

    def __len__(self) -> int:
        return len(self.t)


def make_eval_set(images: Tensor, labels: Tensor, timesteps_per_image: int, seed: int) -> EvalSet:
    """Image i at ``t_ik = ⌊(k + u_ik)/K · T⌋`` for k < K (one timestep in each K-th of the
    schedule, ``u ~ U[0, 1)``), noise ``ε ~ N(0, I)``; all drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    k = timesteps_per_image
    u = torch.rand(len(images), k, generator=gen)
    t = ((torch.arange(k) + u) / k * NUM_STEPS).floor().long().clamp(max=NUM_STEPS - 1).flatten()
    x0 = images.repeat_interleave(k, dim=0)
    return EvalSet(x0, labels.repeat_interleave(k), t, torch.randn(x0.shape, generator=gen))


@torch.no_grad()
def denoising_loss(model: nn.Module, data: EvalSet, batch_size: int = 1024) -> float:
    """Mean ε-prediction MSE over the eval set."""
    total = 0.0
    for start in range(0, len(data), batch_size):
        part = slice(start, start + batch_size)
        errors = prediction_errors(model, data.x0[part], data.labels[part], data.t[part], data.noise[part])
        total += errors.sum().item()
    return total / len(data)


def relative_error(approx: Tensor, target: Tensor, base: Tensor) -> float:
    """``‖W' − W*‖_F / ‖W* − W‖_F``: 0 is exact, 1 is no better than the unadapted W."""
    return (torch.linalg.norm(approx - target) / torch.linalg.norm(target - base)).item()


def energy_rank(delta: Tensor, energy: float = 0.9) -> int:
    """Fewest singular values of ``delta`` holding ``energy`` of ``‖delta‖_F²``."""
    s2 = torch.linalg.svdvals(delta.double()).pow(2)
    return int((s2.cumsum(0) / s2.sum() < energy).sum().item()) + 1


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


class DigitJudge(nn.Module):
    """A small MLP classifier of real digits ``[B, 1, 8, 8]`` (in [−1, 1]): the stand-in for the
    image encoders (CLIP, DINO) that score subject fidelity in the papers."""

    def __init__(self, num_classes: int = 10, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def fit(self, images: Tensor, labels: Tensor, steps: int = 300, seed: int = 0) -> DigitJudge:
        """Full-batch Adam on cross-entropy, with small random shifts of the images (±1 pixel)."""
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=3e-3, weight_decay=1e-4)
        for _ in range(steps):
            dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
            shifted = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(self(shifted), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self.eval().requires_grad_(False)

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return (self(images).argmax(1) == labels).float().mean().item()
