"""Square orthogonal factors: StiefelAdam, the polar retraction, the Cayley map, and the
optimizer set for SODA adapters.

- :class:`StiefelAdam` (Kong, Wang & Tao, ICLR 2023) keeps each ``[k, k]`` parameter X
  orthogonal. With Euclidean gradient G: ``g = XᵀG − GᵀX`` (skew), Adam moments on g,
  ``ξ = lr·m̂/(√v̂ + ε)`` (skew), ``X ← polar(X(I − ξ))``.
- :func:`polar`: ``X(XᵀX)^{-1/2}`` by Newton–Schulz iterations.
- :func:`cayley`: ``Q = (I − S)(I + S)^{-1}`` with S skew, for training Q with plain Adam.

Every optimizer here steps all its tensors at once (:func:`adam`: fused or foreach kernels;
StiefelAdam: one batched update per shape), so a step costs a few ops, not a few per tensor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Adam, AdamW, Optimizer

from .adapters.base import Adapter

SODA_ROLES = ("spectral", "stiefel", "cayley")  # SODA's parameter roles (Adapter.parameter_roles)


def fused_kernels_exist(params: Iterable[Tensor]) -> bool:
    """Whether torch has fused Adam kernels for every tensor's device and dtype."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: CUDA only
        supported = ["cuda"]
    else:
        supported = _get_fused_kernels_supported_devices()
    return all(p.device.type in supported and p.is_floating_point() for p in params)


def adam(kind: type[Adam] | type[AdamW], params: Iterable[Tensor], **settings) -> Optimizer:
    """``kind`` (Adam or AdamW) over ``params``, stepping them all in one fused kernel where the
    device has one, else in one foreach op per stage: 2-15 ops per step whatever the number of
    tensors (the default on CPU is ≈ 10 per tensor). Same update, up to rounding."""
    params = list(params)
    if fused_kernels_exist(params):
        return kind(params, fused=True, **settings)
    return kind(params, foreach=True, **settings)


def polar(x: Tensor, max_iter: int = 30) -> Tensor:
    """The orthogonal polar factor ``X(XᵀX)^{-1/2}`` of square ``x`` ``[..., k, k]``.

    Newton–Schulz: ``Y ← Y(3I − YᵀY)/2`` from ``Y₀ = X/‖XᵀX‖_∞^{1/2}`` (every singular value
    in (0, 1], so it converges; quadratically near orthogonality). Runs in fp64 (fp32 on MPS)
    until ``max|YᵀY − I| ≤ eps^{3/4}`` of that dtype, and returns ``x``'s dtype.
    """
    work = torch.float32 if x.device.type == "mps" else torch.float64
    k = x.shape[-1]
    y = x.reshape(-1, k, k).to(work)  # batched matmuls (bmm) take one op each
    eye = torch.eye(k, dtype=work, device=x.device)
    bound = torch.bmm(y.mT, y).abs().sum(-1).amax(-1)  # ≥ σ_max²
    y = y / bound.sqrt().view(-1, 1, 1)
    tol = torch.finfo(work).eps ** 0.75
    for _ in range(max_iter):
        gram = torch.bmm(y.mT, y)
        if (gram - eye).abs().amax() <= tol:
            break
        y = torch.baddbmm(y, y, gram, beta=1.5, alpha=-0.5)  # Y·(1.5 I − 0.5 YᵀY)
    return y.to(x.dtype).reshape(x.shape)


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

    One step, per parameter X with gradient G (see the module docstring), is batched: the
    parameters of one device and dtype are stacked, sizes k padded with an identity block to
    the bucket's largest size K ≤ 2k (an exact embedding: the update of ``diag(X, I)`` is
    ``diag(X', I)``), updated together and written back in one op per size. The moments of a
    bucket live in two ``[n, K, K]`` tensors whose blocks are the states' ``exp_avg`` and
    ``exp_avg_sq``. ``eps`` = 1e-5 as in the paper.
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
            for bucket in _buckets([p for p in group["params"] if p.grad is not None]):
                self._update(bucket, group)
        return loss

    def _update(self, params: list[Tensor], group: dict) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for state in states:
            state["step"] = state.get("step", 0) + 1
        sizes = _size_ranges(params)
        m, v = self._moments(params, states, sizes)
        x = _stacked(params, sizes, identity=True)
        a = torch.bmm(x.mT, _stacked([p.grad for p in params], sizes, identity=False))
        g = a - a.mT
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        steps = {s["step"] for s in states}
        if len(steps) == 1:
            t = steps.pop()
        else:  # a parameter that had no gradient at some step is behind
            t = torch.tensor([s["step"] for s in states], dtype=x.dtype, device=x.device).view(-1, 1, 1)
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        xi = (m / bias1).mul_(group["lr"]).div_((v / bias2).sqrt_().add_(group["eps"]))  # 0 on the padding
        x = polar(torch.baddbmm(x, x, xi, alpha=-1))  # X(I − ξ)
        for lo, hi, k in sizes:
            torch._foreach_copy_(params[lo:hi], _blocks(x, lo, hi, k).unbind(0))

    def _moments(self, params: list[Tensor], states: list[dict], sizes: list[tuple[int, int, int]]):
        """The bucket's moments ``(m, v)``, each ``[n, K, K]``, zero-padded; each state's
        ``exp_avg``/``exp_avg_sq`` is (made) a view of its block."""
        size = sizes[-1][2]
        held = [s.get("exp_avg") for s in states], [s.get("exp_avg_sq") for s in states]
        bases = [None if t[0] is None else t[0]._base for t in held]
        shared = all(
            base is not None
            and base.shape == (len(params), size, size)
            and all(
                t is not None and t._base is base and t.storage_offset() == i * size * size for i, t in enumerate(ts)
            )
            for base, ts in zip(bases, held, strict=True)
        )
        if shared:
            return bases[0], bases[1]
        moments = []
        for key, ts in zip(("exp_avg", "exp_avg_sq"), held, strict=True):
            buffer = params[0].new_zeros(len(params), size, size)
            for lo, hi, k in sizes:
                blocks = _blocks(buffer, lo, hi, k)
                if all(t is not None for t in ts[lo:hi]):
                    blocks.copy_(torch.stack(ts[lo:hi]))
                for state, block in zip(states[lo:hi], blocks.unbind(0), strict=True):
                    state[key] = block
            moments.append(buffer)
        return moments[0], moments[1]


def _buckets(params: list[Tensor]) -> list[list[Tensor]]:
    """``params`` in buckets updated together: by device and dtype; sizes k joined to a bucket
    of largest size K while K ≤ 2k (padding costs ≤ 8× the flops of these small matmuls and
    saves a batched update). Each bucket sorted by size."""
    kinds: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        kinds[(p.device, p.dtype)].append(p)
    buckets = []
    for members in kinds.values():
        classes: list[list[int]] = []
        for k in sorted({p.shape[-1] for p in members}, reverse=True):
            if classes and 2 * k >= classes[-1][0]:
                classes[-1].append(k)
            else:
                classes.append([k])
        buckets += [sorted((p for p in members if p.shape[-1] in ks), key=lambda p: p.shape[-1]) for ks in classes]
    return buckets


def _size_ranges(params: list[Tensor]) -> list[tuple[int, int, int]]:
    """``(lo, hi, k)``: ``params[lo:hi]`` are ``[k, k]`` (``params`` sorted by size)."""
    ranges: list[tuple[int, int, int]] = []
    for i, p in enumerate(params):
        k = p.shape[-1]
        if ranges and ranges[-1][2] == k:
            ranges[-1] = (ranges[-1][0], i + 1, k)
        else:
            ranges.append((i, i + 1, k))
    return ranges


def _blocks(stacked: Tensor, lo: int, hi: int, k: int) -> Tensor:
    """The leading ``[k, k]`` blocks of ``stacked[lo:hi]`` (contiguous ``[n, K, K]``), one view op."""
    size = stacked.shape[-1]
    if k == size and hi - lo == stacked.shape[0]:
        return stacked
    return stacked.as_strided((hi - lo, k, k), (size * size, size, 1), stacked.storage_offset() + lo * size * size)


def _stacked(tensors: list[Tensor], sizes: list[tuple[int, int, int]], identity: bool) -> Tensor:
    """``tensors`` stacked ``[n, K, K]``, each padded with an identity (or zero) block."""
    if len(sizes) == 1:
        return torch.stack(tensors)
    size, n = sizes[-1][2], len(tensors)
    if identity:
        out = torch.eye(size, dtype=tensors[0].dtype, device=tensors[0].device).expand(n, size, size).clone()
    else:
        out = tensors[0].new_zeros(n, size, size)
    for lo, hi, k in sizes:
        _blocks(out, lo, hi, k).copy_(torch.stack(tensors[lo:hi]))
    return out


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
        "spectral": lambda ps: adam(AdamW, ps, lr=lr_delta, betas=betas, weight_decay=weight_decay),
        "stiefel": lambda ps: StiefelAdam(ps, lr=lr_rotation, betas=betas),
        "cayley": lambda ps: adam(Adam, ps, lr=lr_rotation, betas=betas),
    }
    optimizers = [make[role](list(params.values())) for role, params in roles.items() if params]
    if not optimizers:
        raise ValueError("no trainable SODA parameters found")
    return optimizers
