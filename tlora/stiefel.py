"""Square orthogonal factors: StiefelAdam, the polar retraction, the Cayley map, and the
optimizer set for SODA adapters.

- :class:`StiefelAdam` (Kong, Wang & Tao, ICLR 2023) keeps each ``[k, k]`` parameter X
  orthogonal. With Euclidean gradient G: ``g = XᵀG − GᵀX`` (skew), Adam moments on g,
  ``ξ = lr·m̂/(√v̂ + ε)`` (skew), ``X ← polar(X(I − ξ))``.
- :func:`polar`: ``X(XᵀX)^{-1/2}`` by Newton–Schulz iterations.
- :func:`cayley`: ``Q = (I − S)(I + S)^{-1}`` with S skew, for training Q with plain Adam.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Adam, AdamW, Optimizer

from .adapters.base import Adapter

SODA_ROLES = ("spectral", "stiefel", "cayley")  # SODA's parameter roles (Adapter.parameter_roles)


def polar(x: Tensor, max_iter: int = 30) -> Tensor:
    """The orthogonal polar factor ``X(XᵀX)^{-1/2}`` of square ``x`` ``[..., k, k]``.

    Newton–Schulz: ``Y ← Y(3I − YᵀY)/2`` from ``Y₀ = X/‖XᵀX‖_∞^{1/2}`` (every singular value
    in (0, 1], so it converges; quadratically near orthogonality). Runs in fp64 (fp32 on MPS)
    until ``max|YᵀY − I| ≤ eps^{3/4}`` of that dtype, and returns ``x``'s dtype.
    """
    work = torch.float32 if x.device.type == "mps" else torch.float64
    y = x.to(work)
    eye = torch.eye(x.shape[-1], dtype=work, device=x.device)
    bound = (y.mT @ y).abs().sum(-1).amax(-1)  # ≥ σ_max²
    y = y / bound.sqrt()[..., None, None]
    tol = torch.finfo(work).eps ** 0.75
    for _ in range(max_iter):
        gram = y.mT @ y
        if (gram - eye).abs().amax() <= tol:
            break
        y = y @ (1.5 * eye - 0.5 * gram)
    return y.to(x.dtype)


def cayley(generator: Tensor) -> Tensor:
    """``Q = (I − S)(I + S)^{-1}``, ``S = triu(A, 1) − triu(A, 1)ᵀ`` for ``A`` ``[..., k, k]``.

    Q is orthogonal with det +1 for any A, and ``Q = I`` at ``A = 0``; only A's strict upper
    triangle is used.
    """
    upper = generator.triu(1)
    skew = upper - upper.mT
    eye = torch.eye(generator.shape[-1], dtype=generator.dtype, device=generator.device)
    return torch.linalg.solve(eye + skew, eye - skew)


class StiefelAdam(Optimizer):
    """Adam on square orthogonal parameters (each ``[k, k]`` with ``XᵀX = I`` at the start).

    One step, per parameter X with gradient G (see the module docstring), is batched: all
    parameters of one shape are stacked and updated together. ``eps`` = 1e-5 as in the paper.
    """

    def __init__(
        self,
        params,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-5,
    ):
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid StiefelAdam settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"StiefelAdam needs square matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    buckets[(p.shape, p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._update(params, group)
        return loss

    def _update(self, params: list[Tensor], group: dict) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        x = torch.stack(params)
        m = torch.stack([s["exp_avg"] for s in states])
        v = torch.stack([s["exp_avg_sq"] for s in states])
        a = x.mT @ torch.stack([p.grad for p in params])
        g = a - a.mT
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        steps = torch.tensor([s["step"] for s in states], dtype=x.dtype, device=x.device)[:, None, None]
        xi = group["lr"] * (m / (1 - beta1**steps)) / ((v / (1 - beta2**steps)).sqrt() + group["eps"])
        x = polar(x - x @ xi)
        for i, (p, state) in enumerate(zip(params, states, strict=True)):
            p.copy_(x[i])
            state["exp_avg"].copy_(m[i])
            state["exp_avg_sq"].copy_(v[i])


def soda_optimizers(
    modules: nn.Module | Iterable[nn.Module],
    lr_delta: float,
    lr_rotation: float,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
) -> list[Optimizer]:
    """The optimizers for every SODA adapter in ``modules`` (searched recursively).

    AdamW (``lr_delta``, ``weight_decay``) on the spectral shifts δ; StiefelAdam
    (``lr_rotation``) on orthogonal factors (``rotation="stiefel"``); Adam (``lr_rotation``)
    on Cayley generators (``rotation="cayley"``). A training loop steps and zeroes each.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    roles: dict[str, dict[int, nn.Parameter]] = defaultdict(dict)
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, Adapter):
                for role, params in sub.parameter_roles().items():
                    if role in SODA_ROLES:
                        roles[role].update((id(p), p) for p in params if p.requires_grad)
    make = {
        "spectral": lambda ps: AdamW(ps, lr=lr_delta, betas=betas, weight_decay=weight_decay),
        "stiefel": lambda ps: StiefelAdam(ps, lr=lr_rotation, betas=betas),
        "cayley": lambda ps: Adam(ps, lr=lr_rotation, betas=betas),
    }
    optimizers = [make[role](list(params.values())) for role, params in roles.items() if params]
    if not optimizers:
        raise ValueError("no trainable SODA parameters found")
    return optimizers
