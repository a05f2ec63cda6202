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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from .. import cost, tr, trm
from ..factorize import factorize
from .base import MAX_FILE_ORDER, Adapter, ConvArgs, base_forward, expect, layer_widths

Residual = Literal["tr", "lora", "none"]
Regularizer = Literal["none", "identity", "orthogonal"]
ForwardPath = Literal["auto", "merged", "transform", "contract"]


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
    path: ForwardPath = "auto"

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


def check_widths(
    ins: Mapping[str, int],
    outs: Mapping[str, int],
    ranks: Mapping[str, int],
    weight_shape: tuple[int, ...] | None,
    transform_rank: str = "",
) -> None:
    """The widths a group's parts imply agree (with the layer's, given), and every rank is
    ≥ 1 and at most min(out, in) (the ``transform_rank`` one, on the input side only: ≤ in)."""
    layer = layer_widths(weight_shape) if weight_shape is not None else None
    for side, widths, index in (("input", ins, 1), ("output", outs, 0)):
        values = {**widths, **({"the layer": layer[index]} if layer else {})}
        expect(
            len(set(values.values())) <= 1,
            f"{side} widths disagree: {', '.join(f'{k} {v}' for k, v in values.items())}",
        )
    width_in = layer[1] if layer else next(iter(ins.values()), None)
    width_out = layer[0] if layer else next(iter(outs.values()), None)
    for name, rank in ranks.items():
        bound = width_in if name == transform_rank else min(w for w in (width_in, width_out) if w is not None)
        expect(1 <= rank <= bound, f"{name} {rank} is outside 1..{bound} (the layer's width)")


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

    file_prefix = "tlora."
    file_mark = "tlora.scale"
    file_fixed = ("lora_up", "lora_down")
    file_indexed = ("transform", "residual_out", "residual_in")
    file_layouts = (
        ("transform",),
        ("transform", "residual_out", "residual_in"),
        ("transform", "lora_up", "lora_down"),
        ("residual_out", "residual_in"),
        ("lora_up", "lora_down"),
    )

    @classmethod
    def create_train(
        cls,
        method: str,
        weight: Tensor,
        *,
        seed: int = 0,
        transform_rank: int = 2,
        residual_rank: int = 6,
        regularizer: Regularizer = "none",
        regularizer_weight: float = 0.0,
        **_,
    ) -> TLoRA:
        """The ``method`` preset with the ranks it uses replaced (a rank it does not use is ignored)."""
        overrides = {"regularizer": regularizer, "regularizer_weight": regularizer_weight}
        if PRESETS[method].transform_rank:
            overrides["transform_rank"] = transform_rank
        if PRESETS[method].has_residual:
            overrides["residual_rank"] = residual_rank
        adapter = cls(tuple(weight.shape), preset(method, **overrides), seed=seed).to(weight.device)
        cls.check_file_tensors(adapter.file_tensors(), tuple(weight.shape))  # never train what cannot be loaded
        return adapter

    def file_tensors(self) -> dict[str, Tensor]:
        tensors = super().file_tensors()
        tensors[self.file_mark] = torch.tensor(self.scale, dtype=torch.float32)
        return tensors

    @classmethod
    def from_file_tensors(cls, weight_shape: tuple[int, ...], group: Mapping[str, Tensor]) -> TLoRA:
        state = cls.unprefixed(group)
        return cls.from_state(weight_shape, state, float(state.pop("scale")))

    @classmethod
    def from_state(cls, weight_shape: tuple[int, ...], tensors: Mapping[str, Tensor], scale: float) -> TLoRA:
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

    @classmethod
    def check_file_tensors(cls, group: Mapping[str, Tensor], weight_shape: tuple[int, ...] | None = None) -> None:
        """``scale`` ``[]``; ``transform.{d}`` ``[I_d, I_d, Rt, Rt]``; ``residual_out.{d}``
        ``[O_d, R, R]`` and as many ``residual_in.{d}`` ``[I_d, R, R]`` (the transform's I_d);
        ``lora_up`` ``[out, r]``, ``lora_down`` ``[r, in]``; in = ΠI_d, out = ΠO_d (the layer's,
        given ``weight_shape``); at most MAX_FILE_ORDER cores; Rt ≤ in, R and r ≤ min(out, in)."""
        p = cls.file_prefix
        shapes = cls.file_shapes(group)
        expect(shapes["scale"] == (), f"{cls.file_mark} must be a scalar, got shape {list(shapes['scale'])}")
        cores = _indexed(shapes, "transform")
        outs, ins = _indexed(shapes, "residual_out"), _indexed(shapes, "residual_in")
        expect(max(len(cores), len(outs), len(ins)) <= MAX_FILE_ORDER, f"more than {MAX_FILE_ORDER} cores")
        ins_width: dict[str, int] = {}  # the input width each part implies
        outs_width: dict[str, int] = {}
        ranks: dict[str, int] = {}  # rank name → value, each bounded below
        if cores:
            for d, c in enumerate(cores):
                expect(
                    len(c) == 4 and c[0] == c[1] and c[2] == c[3] == cores[0][2],
                    f"{p}transform.{d} has shape {list(c)}, expected [I, I, Rt, Rt] with one Rt for all cores",
                )
            ins_width[f"{p}transform"] = math.prod(c[0] for c in cores)
            ranks["transform ring rank"] = cores[0][2]
        if outs:
            expect(len(outs) == len(ins), f"{len(outs)} {p}residual_out cores but {len(ins)} {p}residual_in")
            for name, side in (("residual_out", outs), ("residual_in", ins)):
                for d, c in enumerate(side):
                    expect(
                        len(c) == 3 and c[1] == c[2] == outs[0][1],
                        f"{p}{name}.{d} has shape {list(c)}, expected [n, R, R] with one R for all cores",
                    )
            if cores:
                expect(
                    [c[0] for c in ins] == [c[0] for c in cores],
                    f"{p}residual_in factors {[c[0] for c in ins]} differ from the transform's {[c[0] for c in cores]}",
                )
            outs_width[f"{p}residual_out"] = math.prod(c[0] for c in outs)
            ins_width[f"{p}residual_in"] = math.prod(c[0] for c in ins)
            ranks["residual ring rank"] = outs[0][1]
        if "lora_up" in shapes:
            up, down = shapes["lora_up"], shapes["lora_down"]
            expect(
                len(up) == 2 and len(down) == 2 and up[1] == down[0],
                f"{p}lora_up {list(up)} and {p}lora_down {list(down)} are not [out, r] and [r, in]",
            )
            outs_width[f"{p}lora_up"], ins_width[f"{p}lora_down"] = up[0], down[1]
            ranks["LoRA rank"] = up[1]
        check_widths(ins_width, outs_width, ranks, weight_shape, transform_rank="transform ring rank")

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

    def bypass(
        self,
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        weight: Callable[[], Tensor],
        conv: ConvArgs | None = None,
        strength: float = 1.0,
    ) -> Tensor:
        """``base(x + m·x·(T − I)ᵀ) + m·s·x·Δᵀ``: W' at strength m without the base weight (a
        Linear; a conv mixes kernel taps in T, so it goes through the weight change). T runs
        on the activations by the cost model's cheaper route (through the cores, or a dense T)."""
        if conv is not None:
            return super().bypass(x, base, weight, conv, strength)
        x32 = x.float()
        u = x
        if self.config.transform_rank:
            transform = self.choose_path(cost.tokens_of(x.numel(), self.in_features))
            moved = x32 @ self.transform_matrix().T if transform == "transform" else trm.apply(x32, self.cores())
            u = x32.lerp(moved.float(), strength).to(x.dtype)  # autocast may have made ``moved`` half
        y = base(u)
        factors = self.residual_factors()
        if factors is not None:
            up, down = factors
            y = y + ((x32 @ down.T) @ (up.T * (self.scale * strength))).to(y.dtype)
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
