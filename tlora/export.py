"""Export any adapter file (TLoRA family, SODA, LoRA) to a plain LoRA any tool reads (docs/export.md).

Per module, ``ΔW = W' − W`` is computed in fp32 from the file's adapter and the model's base
weight ``W``, then either

- ``"lora"``: truncated to rank ``r`` by SVD, ``ΔW ≈ U_r S_r V_rᵀ``, written as the standard
  ``lora_up.weight = U_r √S_r`` ``[out, r]`` (conv: ``[out, r, 1, 1]``), ``lora_down.weight =
  √S_r V_rᵀ`` ``[r, in]`` (conv: ``[r, in, kh, kw]``) and ``alpha = r`` (scale 1). A rank at least
  ``min(out, in·kh·kw)`` is exact (up to fp32 rounding);
- ``"bake"``: the full ``ΔW`` as ``<module>.diff``, which ComfyUI's LoRA loader adds to the weight.

The relative Frobenius error ``‖ΔW − ΔW_r‖ / ‖ΔW‖`` is reported per layer and overall.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .format import CHECKSUM_KEY, FORMAT_VERSION, AdapterFile, build_adapter, checksum, finite_delta, write_safetensors

MODES = ("lora", "bake")
LOWRANK_MIN_SIDE = 2048  # use the randomized SVD when both sides are at least this and r is small
LOWRANK_MAX_FRACTION = 0.25
COPIED_METADATA = ("tlora.base_model", "tlora.targets", "tlora.steps", "tlora.method")


@dataclass
class LayerExport:
    """One module's export: its weight shape, the rank written, ‖ΔW‖ and the absolute error."""

    module: str
    shape: tuple[int, ...]
    rank: int  # 0 for "bake" (full ΔW)
    norm: float
    error_abs: float

    @property
    def error(self) -> float:
        """Relative Frobenius error (0 for a zero ΔW)."""
        return self.error_abs / self.norm if self.norm > 0 else 0.0


@dataclass
class ExportReport:
    """What :func:`export_adapter` wrote and how faithful it is."""

    source: str
    mode: str
    rank: int
    layers: list[LayerExport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # modules without a base weight (allowed to be missing)
    path: Path | None = None

    @property
    def error(self) -> float:
        """Overall relative error ‖ΔW − ΔW_r‖ / ‖ΔW‖ over all layers together."""
        total = math.sqrt(sum(layer.norm**2 for layer in self.layers))
        residual = math.sqrt(sum(layer.error_abs**2 for layer in self.layers))
        return residual / total if total > 0 else 0.0

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)

    def table(self) -> str:
        """A per-layer table and the overall line, for people."""
        width = max((len(layer.module) for layer in self.layers), default=6)
        lines = [f"{'module':<{width}}  {'shape':<20} {'rank':>5}  rel. error"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            rank = "full" if self.mode == "bake" else str(layer.rank)
            lines.append(f"{layer.module:<{width}}  {shape:<20} {rank:>5}  {layer.error:.3e}")
        lines.append(
            f"overall ({len(self.layers)} layers, {self.mode}"
            f"{'' if self.mode == 'bake' else f', rank {self.rank}'}): rel. error {self.error:.3e}, "
            f"worst layer {self.max_error:.3e}"
        )
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} modules without a base weight (e.g. {self.skipped[0]})")
        if self.path is not None:
            lines.append(f"written: {self.path}")
        return "\n".join(lines)


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(up [out, r], down [r, in])`` with ``up @ down`` the best rank-``r`` approximation of the
    2-D ``delta`` (exact SVD; randomized ``svd_lowrank`` for a small rank of a big matrix). The
    singular values are split evenly, ``√S`` on each side."""
    out_f, in_f = delta.shape
    r = min(rank, out_f, in_f)
    if min(out_f, in_f) >= LOWRANK_MIN_SIDE and r <= LOWRANK_MAX_FRACTION * min(out_f, in_f):
        u, s, v = torch.svd_lowrank(delta, q=min(r + 10, min(out_f, in_f)), niter=4)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    root = s.sqrt()
    return (u * root).contiguous(), (root[:, None] * vh).contiguous()


def layer_delta(group: Mapping[str, Tensor], weight: Tensor, where: str = "") -> Tensor:
    """``ΔW = W' − W`` in fp32 for one module's tensor group and its base weight (checked,
    finite: :func:`tlora.format.build_adapter`, :func:`tlora.format.finite_delta`)."""
    adapter = build_adapter(tuple(weight.shape), group, where).to(weight.device)
    with torch.no_grad():
        return finite_delta(adapter, weight.float(), where)


def export_tensors(
    file: AdapterFile,
    base_weights: Mapping[str, Tensor],
    rank: int,
    mode: str = "lora",
    *,
    allow_missing: Iterable[str] = (),
) -> tuple[dict[str, Tensor], ExportReport]:
    """The exported file's tensors (fp32, on the CPU) and the report. ``base_weights`` maps each
    module of ``file`` to the model's weight for it; modules listed in ``allow_missing`` may lack
    one and are skipped (reported), any other missing module is an error."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {MODES}")
    if mode == "lora" and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer ≥ 1, got {rank!r}")
    allowed = set(allow_missing)
    missing = [m for m in file.modules if m not in base_weights]
    if any(m not in allowed for m in missing):
        bad = [m for m in missing if m not in allowed]
        raise ValueError(
            f"{file.path.name}: no base weight for {len(bad)} of {len(file.modules)} modules "
            f"(e.g. {', '.join(bad[:3])}); use the model the adapter was made for"
        )
    report = ExportReport(file.path.name, mode, rank if mode == "lora" else 0, skipped=missing)
    tensors: dict[str, Tensor] = {}
    for module, group in file.modules.items():
        if module not in base_weights:
            continue
        weight = base_weights[module]
        try:
            delta = layer_delta(group, weight)
        except ValueError as err:
            raise ValueError(f"{file.path.name}: {module} does not fit its base weight: {err}") from None
        shape = tuple(delta.shape)
        norm = float(torch.linalg.vector_norm(delta))
        if mode == "bake":
            tensors[f"{module}.diff"] = delta.cpu()
            report.layers.append(LayerExport(module, shape, 0, norm, 0.0))
            continue
        flat = delta.reshape(shape[0], -1)
        up, down = low_rank(flat, rank)
        error_abs = float(torch.linalg.vector_norm(flat - up @ down))
        r = up.shape[1]
        if len(shape) == 4:
            up, down = up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
        tensors[f"{module}.lora_up.weight"] = up.cpu()
        tensors[f"{module}.lora_down.weight"] = down.cpu()
        tensors[f"{module}.alpha"] = torch.tensor(float(r))
        report.layers.append(LayerExport(module, shape, r, norm, error_abs))
    return tensors, report


def export_adapter(
    file: AdapterFile,
    base_weights: Mapping[str, Tensor],
    output: str | os.PathLike,
    rank: int,
    mode: str = "lora",
    *,
    overwrite: bool = False,
    allow_missing: Iterable[str] = (),
) -> ExportReport:
    """Export ``file`` (see :func:`export_tensors`) and write it atomically to ``output``, with
    ``tlora.exported_from``, ``tlora.export_rank``, ``tlora.export_mode`` and
    ``tlora.export_error`` in the metadata. Refuses to replace a file unless ``overwrite``."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; choose another name or allow overwriting")
    tensors, report = export_tensors(file, base_weights, rank, mode, allow_missing=allow_missing)
    if not tensors:
        raise ValueError(f"{file.path.name}: nothing to export (no module has a base weight)")
    meta = {k: file.metadata[k] for k in COPIED_METADATA if k in file.metadata}
    meta.update(
        {
            "tlora.format_version": FORMAT_VERSION,
            "tlora.method": "lora" if mode == "lora" else "diff",
            "tlora.exported_from": file.path.name,
            "tlora.exported_from_method": file.metadata.get("tlora.method", "unknown"),
            "tlora.export_mode": mode,
            "tlora.export_rank": str(rank) if mode == "lora" else "full",
            "tlora.export_error": f"{report.error:.6e}",
        }
    )
    meta[CHECKSUM_KEY] = checksum(tensors, meta)
    report.path = write_safetensors(output, tensors, meta, overwrite=overwrite)
    return report


def checkpoint_keys(module: str) -> list[str]:
    """Where a file module's weight may sit in a checkpoint: ComfyUI's full SD checkpoints keep the
    UNet under ``model.diffusion_model.``; a bare UNet file under ``diffusion_model.`` or nothing."""
    if module.startswith("diffusion_model."):
        rest = module[len("diffusion_model.") :]
        return [f"model.{module}.weight", f"{module}.weight", f"{rest}.weight"]
    return [f"{module}.weight"]


def checkpoint_weights(checkpoint: str | os.PathLike, modules: Iterable[str]) -> dict[str, Tensor]:
    """The base weights of ``modules`` read from a safetensors checkpoint, loading only those
    tensors. Modules it does not hold are left out (the caller decides whether that is fine)."""
    from safetensors import safe_open

    found: dict[str, Tensor] = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        keys = set(f.keys())
        for module in modules:
            key = next((k for k in checkpoint_keys(module) if k in keys), None)
            if key is not None:
                found[module] = f.get_tensor(key)
    return found
