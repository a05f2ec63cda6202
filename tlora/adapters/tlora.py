"""TLoRA and its family on one class: ``W' = W·T + s·Δ``.

- T: input-side transform, a tensor-ring matrix (:mod:`tlora.trm`) of ring rank
  ``transform_rank`` (0: no transform, T = I);
- Δ: residual, a tensor ring (:mod:`tlora.tr`, ``residual="tr"``), a LoRA ``B·A``
  (``residual="lora"``) or nothing;
- s: ``alpha / √rank`` (rank-stabilised) or ``alpha / rank`` (classic LoRA).

The named methods are presets of :class:`TLoRAConfig` (:data:`PRESETS`): TLoRA (TRM + TR),
TLoRA* (TRM + LoRA), transform-only, residual-only and plain LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from .. import cost, tr, trm
from ..factorize import factorize
from .base import Adapter, ConvArgs, base_forward

Residual = Literal["tr", "lora", "none"]
Regularizer = Literal["none", "identity", "orthogonal"]
Path = Literal["auto", "merged", "transform", "contract"]


@dataclass(frozen=True)
class TLoRAConfig:
    """Hyper-parameters of one TLoRA-family adapter (shared by every adapted layer)."""

    transform_rank: int = 2
    residual: Residual = "tr"
    residual_rank: int = 6
    alpha: float = 1.0
    rank_stabilized: bool = True
    num_factors: int = 3
    regularizer: Regularizer = "none"
    regularizer_weight: float = 0.0
    path: Path = "auto"

    def __post_init__(self):
        if self.transform_rank < 0 or self.residual_rank < 0 or self.num_factors < 1:
            raise ValueError(f"ranks and num_factors must be non-negative: {self}")
        if self.residual not in ("tr", "lora", "none"):
            raise ValueError(f"residual must be 'tr', 'lora' or 'none', got {self.residual!r}")
        if self.transform_rank == 0 and (self.residual == "none" or self.residual_rank == 0):
            raise ValueError("an adapter needs a transform (transform_rank > 0) or a residual")

    @property
    def has_residual(self) -> bool:
        return self.residual != "none" and self.residual_rank > 0

    @property
    def scale(self) -> float:
        """The residual's multiplier s."""
        if not self.has_residual:
            return 0.0
        denom = math.sqrt(self.residual_rank) if self.rank_stabilized else self.residual_rank
        return self.alpha / denom


PRESETS: dict[str, TLoRAConfig] = {
    "tlora": TLoRAConfig(transform_rank=2, residual="tr", residual_rank=6),
    "tlora_star": TLoRAConfig(transform_rank=2, residual="lora", residual_rank=4),
    "transform": TLoRAConfig(transform_rank=2, residual="none", residual_rank=0),
    "residual": TLoRAConfig(transform_rank=0, residual="tr", residual_rank=6),
    "lora": TLoRAConfig(transform_rank=0, residual="lora", residual_rank=4, alpha=4.0, rank_stabilized=False),
}


def preset(method: str, **overrides) -> TLoRAConfig:
    """A named method's config with some fields replaced (``alpha`` follows a LoRA rank
    override so that LoRA's scale stays 1 unless ``alpha`` is given)."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[method]
    if method == "lora" and "residual_rank" in overrides and "alpha" not in overrides:
        overrides["alpha"] = float(overrides["residual_rank"])
    return replace(base, **overrides)


def method_name(config: TLoRAConfig) -> str:
    """The preset name that describes ``config``'s structure."""
    if config.transform_rank == 0:
        return "lora" if config.residual == "lora" else "residual"
    if not config.has_residual:
        return "transform"
    return "tlora" if config.residual == "tr" else "tlora_star"


def _indexed(tensors: Mapping[str, Tensor], name: str) -> list[Tensor]:
    """``tensors[f"{name}.0"], tensors[f"{name}.1"], …`` up to the first missing index."""
    out = []
    while f"{name}.{len(out)}" in tensors:
        out.append(tensors[f"{name}.{len(out)}"])
    return out


def in_dtype_of(x: Tensor, m: Tensor) -> Tensor:
    """``m`` for a matmul with ``x``: in ``x``'s dtype (unless autocast, when on, picks it)."""
    if m.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return m
    return m.to(x.dtype)


class TLoRA(Adapter):
    """``W' = W·T + s·Δ`` for one Linear or Conv2d weight.

    Parameters (stable names): ``transform.{d}`` ``[I_d, I_d, Rt, Rt]``;
    ``residual_out.{d}`` ``[O_d, R, R]`` and ``residual_in.{d}`` ``[I_d, R, R]`` (TR), or
    ``lora_up`` ``[out, r]`` and ``lora_down`` ``[r, in]`` (LoRA).
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        config: TLoRAConfig = PRESETS["tlora"],
        *,
        seed: int = 0,
        in_factors: tuple[int, ...] | None = None,
        out_factors: tuple[int, ...] | None = None,
    ):
        super().__init__(weight_shape)
        self.config = config
        self.method = method_name(config)
        self.scale = config.scale
        self.prepared: tuple[Tensor | None, ...] | None = None  # set by tlora.batched.prepared
        gen = torch.Generator().manual_seed(seed)
        self.in_factors = in_factors or factorize(self.in_features, config.num_factors)
        self.out_factors = out_factors or factorize(self.out_features, config.num_factors)
        for side, factors, width in (
            ("input", self.in_factors, self.in_features),
            ("output", self.out_factors, self.out_features),
        ):
            if math.prod(factors) != width:
                raise ValueError(
                    f"made for a layer with {math.prod(factors)} {side}s (factors {factors}), this layer has {width}"
                )

        self.transform = nn.ParameterList()
        self._anchor: list[Tensor] = []
        if config.transform_rank:
            self._anchor = trm.identity_cores(self.in_factors, config.transform_rank, seed=seed)
            self.transform.extend(nn.Parameter(c.clone()) for c in self._anchor)

        self.residual_out = nn.ParameterList()
        self.residual_in = nn.ParameterList()
        self.lora_up: nn.Parameter | None = None
        self.lora_down: nn.Parameter | None = None
        if config.has_residual and config.residual == "tr":
            outs, ins = tr.init_cores(self.out_factors, self.in_factors, config.residual_rank, generator=gen)
            self.residual_out.extend(nn.Parameter(c) for c in outs)
            self.residual_in.extend(nn.Parameter(c) for c in ins)
        elif config.has_residual:
            r = config.residual_rank
            down = torch.empty(r, self.in_features)
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=√5), as nn.Linear
            down.uniform_(-bound, bound, generator=gen)
            self.lora_down = nn.Parameter(down)
            self.lora_up = nn.Parameter(torch.zeros(self.out_features, r))

        effective_rank = 0
        if config.has_residual:
            effective_rank = config.residual_rank**2 if config.residual == "tr" else config.residual_rank
        self.cost_shape = cost.LayerShape(
            self.in_features,
            self.out_features,
            self.in_factors if config.transform_rank else (),
            config.transform_rank,
            effective_rank,
        )

    @classmethod
    def from_tensors(cls, weight_shape: tuple[int, ...], tensors: Mapping[str, Tensor], scale: float) -> TLoRA:
        """Rebuild an adapter from its ``state_dict`` alone (ranks and factors read off the
        tensor shapes), with residual multiplier ``scale``. Raises ValueError when the tensors
        are incomplete or do not fit ``weight_shape``."""
        cores = _indexed(tensors, "transform")
        outs, ins = _indexed(tensors, "residual_out"), _indexed(tensors, "residual_in")
        has_lora = "lora_up" in tensors or "lora_down" in tensors
        if bool(outs) != bool(ins) or (has_lora and not {"lora_up", "lora_down"} <= set(tensors)):
            raise ValueError(f"incomplete residual tensors: {sorted(tensors)}")
        if not (cores or outs or has_lora):
            raise ValueError(f"no TLoRA tensors among {sorted(tensors)}")
        if outs:
            residual, rank = "tr", outs[0].shape[1]
        elif has_lora:
            residual, rank = "lora", tensors["lora_up"].shape[1]
        else:
            residual, rank = "none", 0
        config = TLoRAConfig(
            transform_rank=cores[0].shape[2] if cores else 0,
            residual=residual,
            residual_rank=rank,
            num_factors=len(cores or ins or [None]),
        )
        in_factors = tuple(c.shape[1] for c in cores) or tuple(c.shape[0] for c in ins) or None
        out_factors = tuple(c.shape[0] for c in outs) or None
        adapter = cls(weight_shape, config, in_factors=in_factors, out_factors=out_factors)
        try:
            adapter.load_state_dict({k: v.float() for k, v in tensors.items()})
        except RuntimeError as err:
            raise ValueError(f"tensors do not fit a layer weight of shape {tuple(weight_shape)}: {err}") from None
        adapter.scale = float(scale)
        return adapter

    # -- the structured pieces -------------------------------------------------------------
    def cores(self) -> list[Tensor]:
        return list(self.transform)

    def transform_matrix(self) -> Tensor:
        """The dense ``[in, in]`` T (identity when there is no transform)."""
        if not self.config.transform_rank:
            return torch.eye(self.in_features, device=self._device())
        return trm.materialize(self.cores())

    def residual_factors(self) -> tuple[Tensor, Tensor] | None:
        """``(up [out, r], down [r, in])`` with ``Δ = up @ down``, unscaled; None without one."""
        if not self.config.has_residual:
            return None
        if self.config.residual == "tr":
            return tr.low_rank_factors(list(self.residual_out), list(self.residual_in))
        return self.lora_up, self.lora_down

    # -- the interface ---------------------------------------------------------------------
    def merged_weight(self, weight: Tensor) -> Tensor:
        flat = self._flat(weight)
        if self.config.transform_rank:
            flat = self._times_transform(flat)
        factors = self.residual_factors()
        if factors is not None:
            up, down = factors
            flat = torch.addmm(flat, up, down, alpha=self.scale)
        return flat.reshape(self.weight_shape)

    def delta_weight(self, weight: Tensor) -> Tensor:
        """``W·T − W + s·Δ`` built in one buffer (no ``W'`` and no second fp32 copy of W)."""
        flat = self._flat(weight)
        factors = self.residual_factors()
        if not self.config.transform_rank:
            up, down = factors
            return ((up * self.scale) @ down).reshape(self.weight_shape)
        delta = self._times_transform(flat).sub_(flat)
        if factors is not None:
            delta.addmm_(*factors, alpha=self.scale)
        return delta.reshape(self.weight_shape)

    def _flat(self, weight: Tensor) -> Tensor:
        """``weight`` in fp32 as ``[out, in]``."""
        self._check_weight(weight)
        return weight.float().reshape(self.out_features, self.in_features)

    def _times_transform(self, flat: Tensor) -> Tensor:
        """``W·T`` (a new tensor), through a dense T or mode by mode, whichever is cheaper."""
        if cost.dense_merge_is_cheaper(self.cost_shape):
            return flat @ self.transform_matrix()
        return trm.apply_to_weight(flat, self.cores())

    def choose_path(self, tokens: int) -> str:
        if self.config.path != "auto":
            return self.config.path
        return cost.choose_path(tokens, self.cost_shape)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, conv: ConvArgs | None = None) -> Tensor:
        if conv is not None:
            return super().forward(x, weight, bias, conv)
        if self.prepared is not None:
            return self._prepared_forward(x, weight, bias)
        path = self.choose_path(cost.tokens_of(x.numel(), self.in_features))
        if path == "merged":
            return super().forward(x, weight, bias, conv)
        x32 = x.float()
        if not self.config.transform_rank:
            u = x
        elif path == "transform":
            u = (x32 @ self.transform_matrix().T).to(x.dtype)
        else:
            u = trm.apply(x32, self.cores()).to(x.dtype)
        y = base_forward(u, weight, bias, None)
        factors = self.residual_factors()
        if factors is not None:
            up, down = factors
            y = y + ((x32 @ down.T) @ (up.T * self.scale)).to(y.dtype)
        return y

    def _prepared_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(x + x·Eᵀ, W, b) + (x·downᵀ)·upᵀ`` on factors built by
        :func:`tlora.batched.prepared`: ``(Eᵀ = Tᵀ − I, downᵀ, (s·up)ᵀ)``, each None if absent.
        On ``x``'s rows as one matrix: each product is one (add)mm, as few ops as a LoRA's."""
        excess_t, down_t, up_t = self.prepared
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        u = rows if excess_t is None else torch.addmm(rows, rows, in_dtype_of(x, excess_t))
        y = base_forward(u, weight, bias, None)
        if up_t is not None:
            y = torch.addmm(y, rows @ in_dtype_of(x, down_t), in_dtype_of(x, up_t))
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @property
    def has_regularizer(self) -> bool:
        cfg = self.config
        return cfg.regularizer != "none" and cfg.regularizer_weight != 0 and bool(cfg.transform_rank)

    def regularizer(self) -> Tensor:
        if not self.has_regularizer:
            return super().regularizer()
        kind, weight = self.config.regularizer, self.config.regularizer_weight
        fn = trm.identity_regularizer if kind == "identity" else trm.orthogonal_regularizer
        return weight * fn(self.cores(), self._anchor)
