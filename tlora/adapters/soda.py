"""SODA (Zhang et al., WACV 2025) and SVDiff on one class: ``W' = U diag(ReLU(σ+δ)) Vh · Oᵀ``.

- ``W = U diag(σ) Vh``: thin SVD of the flattened base weight ``[out, in]``, r = min(out, in),
  computed once in fp64 (or fp32) whatever the weight's dtype; frozen, never saved
  (:meth:`SODA.bind` recomputes it from the base weight).
- δ ``[r]``: the spectral shift; 0 at init, so step 0 is exactly the base model.
- ``O = Q_1⊗…⊗Q_k`` ``[in, in]``: an orthogonal Kronecker rotation of the input side,
  applied mode by mode, never built. Q_d is trained on the orthogonal group by StiefelAdam
  (``rotation="stiefel"``) or through the Cayley map with Adam (``rotation="cayley"``).
- SVDiff (preset ``"svdiff"``) is the same without the rotation.

The frozen residual ``W − U diag(σ) Vh`` is kept implicitly: the merge computes
``(W + U diag(ReLU(σ+δ) − σ) Vh)·Oᵀ``, which is W bit for bit at init.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import KERNEL_COST, MEMORY_COST, tokens_of
from ..factorize import factorize
from ..fingerprint import OnMismatch, check_fingerprint, fingerprint
from ..stiefel import cayley
from .base import MAX_FILE_ORDER, Adapter, ConvArgs, expect, layer_widths
from .tlora import in_dtype_of

Rotation = Literal["stiefel", "cayley", "none"]
ForwardPath = Literal["auto", "merged", "activations"]
SVDDtype = Literal["float64", "float32"]

# SODA's reference factorizations (3 factors), from the paper's code.
SODA_FACTORS: Mapping[int, tuple[int, ...]] = {
    640: (8, 8, 10),
    768: (6, 8, 16),
    1280: (4, 16, 20),
    2048: (4, 8, 64),
}


@dataclass(frozen=True)
class SODAConfig:
    """Hyper-parameters of one SODA-family adapter (shared by every adapted layer).

    ``delta_init``: 0 (exact base at step 0) or the reference's 1e-3; ``path``: training
    forward, chosen per call from :func:`path_costs` when ``"auto"``.
    """

    rotation: Rotation = "stiefel"
    num_factors: int = 3
    delta_init: float = 0.0
    svd_dtype: SVDDtype = "float64"
    path: ForwardPath = "auto"

    def __post_init__(self):
        if self.rotation not in ("stiefel", "cayley", "none"):
            raise ValueError(f"rotation must be 'stiefel', 'cayley' or 'none', got {self.rotation!r}")
        if self.svd_dtype not in ("float64", "float32"):
            raise ValueError(f"svd_dtype must be 'float64' or 'float32', got {self.svd_dtype!r}")
        if self.path not in ("auto", "merged", "activations"):
            raise ValueError(f"path must be 'auto', 'merged' or 'activations', got {self.path!r}")
        if self.num_factors < 1:
            raise ValueError(f"num_factors must be positive, got {self.num_factors}")


SODA_PRESETS: dict[str, SODAConfig] = {
    "soda": SODAConfig(),
    "svdiff": SODAConfig(rotation="none"),
}


def soda_preset(method: str, **overrides) -> SODAConfig:
    """A named method's config with some fields replaced."""
    if method not in SODA_PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(SODA_PRESETS)}")
    return replace(SODA_PRESETS[method], **overrides)


def rotation_factors(width: int, num_factors: int = 3) -> tuple[int, ...]:
    """Sizes ``k_d`` (ascending, Πk_d = width) of the rotation's factors: the reference table
    where it has the width, else the balanced split of :func:`factorize`; factors of size 1
    (always the identity) are dropped."""
    return tuple(k for k in factorize(width, num_factors, table=SODA_FACTORS) if k > 1)


def kron_apply(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``x @ (F_1⊗…⊗F_k)ᵀ`` for ``x`` ``[..., n]``, ``F_d`` ``[k_d, k_d]``, ``n = Πk_d``.

    One mode at a time (C-order): contract the leading mode with ``F_d`` and move it last;
    after k steps the modes are back in order. Cost ``N·n·Σk_d`` plus k permute-copies.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    z = x.reshape(-1, n)
    for f in factors:
        z = (z.reshape(z.shape[0], f.shape[0], -1).transpose(1, 2) @ f.T).reshape(z.shape[0], n)
    return z.reshape(*lead, n)


def path_costs(tokens: int, out_features: int, in_features: int, factors: tuple[int, ...]) -> dict[str, float]:
    """Estimated forward+backward cost (MACs, input gradient included) of a training step.

    - ``merged``: build ``W'`` (``U diag Vh``: ``m·r·n`` and again in backward; the rotation
      of its m rows: ``m·n·Σk``, three times), then one matmul whose backward pays the weight
      gradient too: ``3·N·m·n``.
    - ``activations``: rotate the N tokens (``3·N·n·Σk``), then ``·Vhᵀ`` and ``·(U diag)ᵀ``
      and their input gradients: ``2·N·r·(m + n)``.
    """
    m, n, rank = out_features, in_features, min(out_features, in_features)
    rows_rotated = {"merged": m, "activations": tokens}
    rotation = {path: 3 * rows * n * (sum(factors) + MEMORY_COST * len(factors)) for path, rows in rows_rotated.items()}
    kernels = KERNEL_COST * 3 * (2 + len(factors))
    return {
        "merged": 2 * m * n * rank + rotation["merged"] + 3 * tokens * m * n + kernels,
        "activations": 2 * tokens * rank * (m + n) + rotation["activations"] + kernels,
    }


def combined_weight(weight: Tensor, adapters: Sequence[Adapter], strengths: Sequence[float] | None = None) -> Tensor:
    """``W + Σ_i s_i·(W'_i − W)`` in fp32: adapters combined in weight space.

    The only sound way to combine SODA adapters: averaging their Q factors would leave the
    orthogonal group (and their spectra refer to the same U, Vh only by accident).
    """
    strengths = [1.0] * len(adapters) if strengths is None else list(strengths)
    if len(strengths) != len(adapters):
        raise ValueError(f"got {len(adapters)} adapters but {len(strengths)} strengths")
    merged = weight.float().clone()
    for adapter, strength in zip(adapters, strengths, strict=True):
        merged.add_(adapter.delta_weight(weight), alpha=strength)
    return merged


def _reverify_after_load(module: SODA, incompatible_keys) -> None:
    module._verified = False


class SODA(Adapter):
    """``W' = (W + U diag(ReLU(σ+δ) − σ) Vh)·Oᵀ`` for one Linear or Conv2d weight.

    Parameters (stable names): ``delta`` ``[r]``; ``rotation.{d}`` ``[k_d, k_d]`` (Q_d itself,
    ``rotation="stiefel"``) or ``cayley.{d}`` ``[k_d, k_d]`` (its generator, Q_d =
    :func:`~tlora.stiefel.cayley`). Persistent buffer ``base_fingerprint`` (int64 scalar,
    :mod:`tlora.fingerprint`; 0 until bound). Non-persistent fp32 buffers ``U`` ``[out, r]``,
    ``sigma`` ``[r]``, ``Vh`` ``[r, in]``.

    The SVD is taken from the first weight the adapter sees (or an explicit :meth:`bind`) and
    reused afterwards whatever weight is passed; loading a state dict makes the next use
    check the weight against the loaded fingerprint.
    """

    prepared: tuple[Tensor | None, Tensor] | None = None  # set by tlora.batched.prepared

    def __init__(self, weight_shape: tuple[int, ...], config: SODAConfig = SODA_PRESETS["soda"]):
        super().__init__(weight_shape)
        self.config = config
        self.method = "svdiff" if config.rotation == "none" else "soda"
        self.rank = min(self.out_features, self.in_features)
        self.factors = () if config.rotation == "none" else rotation_factors(self.in_features, config.num_factors)
        self.delta = nn.Parameter(torch.full((self.rank,), float(config.delta_init)))
        stiefel, generators = config.rotation == "stiefel", config.rotation == "cayley"
        self.rotation = nn.ParameterList(nn.Parameter(torch.eye(k)) for k in self.factors if stiefel)
        self.cayley = nn.ParameterList(nn.Parameter(torch.zeros(k, k)) for k in self.factors if generators)
        self.register_buffer("base_fingerprint", torch.zeros((), dtype=torch.int64))
        for name in ("U", "sigma", "Vh"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self._svd_of: int | None = None  # fingerprint of the weight U, sigma, Vh come from
        self._verified = False
        self.register_load_state_dict_post_hook(_reverify_after_load)

    file_prefix = "soda."
    file_mark = "soda.base_fingerprint"
    file_fixed = ("delta",)
    file_indexed = ("rotation", "cayley")
    file_layouts = (("delta", "rotation"), ("delta", "cayley"), ("delta",))

    @classmethod
    def create_train(cls, method: str, weight: Tensor, **_) -> SODA:
        """The ``method`` preset, its SVD taken of ``weight`` (ranks do not apply to SODA)."""
        adapter = cls(tuple(weight.shape), soda_preset(method)).to(weight.device)
        adapter.bind(weight)
        return adapter

    @classmethod
    def from_file_tensors(cls, weight_shape: tuple[int, ...], group: Mapping[str, Tensor]) -> SODA:
        """The rotation kind is read off the keys (``rotation.*``: Stiefel, ``cayley.*``, none: SVDiff)."""
        state = cls.unprefixed(group)
        rotation = "stiefel" if "rotation.0" in state else "cayley" if "cayley.0" in state else "none"
        adapter = cls(weight_shape, soda_preset("svdiff" if rotation == "none" else "soda", rotation=rotation))
        try:
            adapter.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"SODA tensors do not fit a layer weight of shape {tuple(weight_shape)}: {err}") from None
        return adapter

    @classmethod
    def check_file_tensors(cls, group: Mapping[str, Tensor], weight_shape: tuple[int, ...] | None = None) -> None:
        """``base_fingerprint`` an int64 scalar; ``delta`` ``[r]``; ``rotation.{d}`` (or
        ``cayley.{d}``) ``[k_d, k_d]``, k_d ≥ 2, Πk_d = in, r ≤ in; given ``weight_shape``:
        r = min(out, in) and the k_d are :func:`rotation_factors` of the layer's in."""
        p = cls.file_prefix
        shapes = cls.file_shapes(group, integer=("base_fingerprint",))
        expect(shapes["base_fingerprint"] == (), f"{cls.file_mark} must be a scalar")
        expect(len(shapes["delta"]) == 1, f"{p}delta must be 1-D, got shape {list(shapes['delta'])}")
        rank = shapes["delta"][0]
        kind = "rotation" if "rotation.0" in shapes else "cayley"
        factors = [shapes[f"{kind}.{d}"] for d in range(MAX_FILE_ORDER + 1) if f"{kind}.{d}" in shapes]
        expect(len(factors) <= MAX_FILE_ORDER, f"more than {MAX_FILE_ORDER} rotation factors")
        for d, f in enumerate(factors):
            expect(len(f) == 2 and f[0] == f[1] >= 2, f"{p}{kind}.{d} has shape {list(f)}, expected [k, k], k ≥ 2")
        sizes = tuple(f[0] for f in factors)
        if weight_shape is not None:
            out_features, in_features = layer_widths(weight_shape)
            expect(
                rank == min(out_features, in_features),
                f"{p}delta has {rank} values; a layer of shape {list(weight_shape)} has "
                f"{min(out_features, in_features)} singular values",
            )
            expected = rotation_factors(in_features, SODA_PRESETS["soda"].num_factors)
            expect(
                not factors or sizes == expected,
                f"{p}{kind} factors {list(sizes)} do not rotate this layer's {in_features} inputs ({list(expected)})",
            )
        elif factors:
            width = math.prod(sizes)
            expect(rank <= width, f"{p}delta has {rank} values, more than the {width} inputs its rotation acts on")

    # -- the frozen SVD --------------------------------------------------------------------
    def bind(self, weight: Tensor, on_mismatch: OnMismatch = "raise") -> None:
        """Check ``weight`` against the recorded fingerprint (recording it if none is) and
        take its SVD unless the buffers already hold it."""
        self._check_weight(weight)
        actual = fingerprint(weight)
        recorded = int(self.base_fingerprint)
        check_fingerprint(recorded, actual, on_mismatch, what=f"{type(self).__name__} adapter")
        if actual != self._svd_of:
            self._decompose(weight)
            self._svd_of = actual
        if not recorded:
            self.base_fingerprint.fill_(actual)
        self._verified = True

    def _decompose(self, weight: Tensor) -> None:
        dtype = torch.float64 if self.config.svd_dtype == "float64" else torch.float32
        flat = weight.detach().reshape(self.out_features, self.in_features)
        if flat.device.type == "mps":  # no fp64 (nor SVD) there
            flat = flat.cpu()
        u, s, vh = torch.linalg.svd(flat.to(dtype), full_matrices=False)
        device = self.delta.device
        self.U, self.sigma, self.Vh = (t.to(device, torch.float32) for t in (u, s, vh))

    def _ensure_bound(self, weight: Tensor) -> None:
        if not self._verified:
            self.bind(weight)

    # -- the trainable pieces ----------------------------------------------------------------
    def spectrum(self) -> Tensor:
        """``ReLU(σ + δ)`` ``[r]`` (needs a bound weight)."""
        return torch.relu(self.sigma + self.delta)

    def rotation_factors(self) -> list[Tensor]:
        """``[Q_1, …, Q_k]`` (empty without a rotation)."""
        if self.config.rotation == "cayley":
            return [cayley(a) for a in self.cayley]
        return list(self.rotation)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer (see :func:`tlora.stiefel.soda_optimizers`)."""
        return {"spectral": [self.delta], "stiefel": list(self.rotation), "cayley": list(self.cayley)}

    # -- the interface -----------------------------------------------------------------------
    def merged_weight(self, weight: Tensor) -> Tensor:
        self._check_weight(weight)
        self._ensure_bound(weight)
        flat = weight.float().reshape(self.out_features, self.in_features)
        flat = torch.addmm(flat, self.U * (self.spectrum() - self.sigma), self.Vh)
        if self.factors:
            flat = kron_apply(flat, self.rotation_factors())
        return flat.reshape(self.weight_shape)

    def choose_path(self, tokens: int) -> str:
        if self.config.path != "auto":
            return self.config.path
        costs = path_costs(tokens, self.out_features, self.in_features, self.factors)
        return min(costs, key=costs.__getitem__)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, conv: ConvArgs | None = None) -> Tensor:
        """Merged path, or on the activations: ``((x·O)·Vhᵀ·diag(ReLU(σ+δ)))·Uᵀ + b`` in fp32."""
        if self.prepared is not None and conv is None:
            return self._prepared_forward(x, weight, bias)
        if conv is not None or self.choose_path(tokens_of(x.numel(), self.in_features)) == "merged":
            return super().forward(x, weight, bias, conv)
        self._check_weight(weight)
        self._ensure_bound(weight)
        z = x.float()
        if self.factors:
            z = kron_apply(z, [q.T for q in self.rotation_factors()])
        y = F.linear(F.linear(z, self.Vh), self.U * self.spectrum(), None if bias is None else bias.float())
        return y.to(x.dtype)

    def bypass(
        self,
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        weight: Callable[[], Tensor],
        conv: ConvArgs | None = None,
        strength: float = 1.0,
    ) -> Tensor:
        """``base(x + m·(x·O − x)) + m·(x·O)·Vhᵀ·diag(ReLU(σ+δ) − σ)·Uᵀ``: W' at strength m
        without merging (a Linear; a conv goes through the weight change). The SVD is the
        base weight's, taken once (``weight()`` is read only for that)."""
        if conv is not None:
            return super().bypass(x, base, weight, conv, strength)
        if not self._verified:
            self.bind(weight(), on_mismatch="warn")
        x32 = x.float()
        rotated = kron_apply(x32, [q.T for q in self.rotation_factors()]) if self.factors else x32
        y = base(x32.lerp(rotated.float(), strength).to(x.dtype) if self.factors else x)  # autocast: half
        shift = self.U * ((self.spectrum() - self.sigma) * strength)
        return y + F.linear(F.linear(rotated, self.Vh), shift).to(y.dtype)

    def _prepared_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(F.linear(x + x·(O − I), Vh)·s, U, b)`` on factors built by
        :func:`tlora.batched.prepared`: ``(O − I`` ``[in, in]`` or None, ``s = ReLU(σ+δ)``)."""
        self._check_weight(weight)
        excess_t, spectrum = self.prepared
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        u = rows if excess_t is None else torch.addmm(rows, rows, in_dtype_of(x, excess_t))
        z = F.linear(u, self.Vh.to(u.dtype)) * spectrum
        y = F.linear(z, self.U.to(z.dtype), None if bias is None else bias.to(z.dtype)).to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
