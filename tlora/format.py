"""The adapter file: safetensors, one group of tensors per adapted module (docs/format.md).

Keys are ``<module>.<suffix>``, ``<module>`` being the key ComfyUI's LoRA loader maps onto a
model weight (``diffusion_model.<unet module>``, ``text_encoders.<clip module>``). Suffixes:

- TLoRA family: ``tlora.transform.{d}``, ``tlora.residual_out.{d}``, ``tlora.residual_in.{d}``,
  ``tlora.lora_up``, ``tlora.lora_down`` and the scalar ``tlora.scale`` (present for every
  module: it marks the group);
- SODA: ``soda.delta``, ``soda.rotation.{d}`` (or ``soda.cayley.{d}``) and the int64 scalar
  ``soda.base_fingerprint`` of the weight it was trained on (it marks the group);
- plain LoRA: the standard ``lora_up.weight``, ``lora_down.weight``, ``alpha``, so any LoRA
  loader reads it.

Every tensor needed to rebuild a module's adapter is in the file; the header metadata
(``modelspec.*`` and ``tlora.*``, strings) is for people and tools. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapters.base import Adapter
from .adapters.soda import SODA, soda_preset
from .adapters.tlora import TLoRA

FORMAT_VERSION = "1"
CHECKSUM_KEY = "tlora.checksum"
TLORA_MARK = "tlora.scale"
SODA_MARK = "soda.base_fingerprint"
LORA_MARK = "lora_up.weight"


class AdapterFileError(ValueError):
    """A file that cannot be used as an adapter file; the message says why and what to do."""


def adapter_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """``suffix → tensor`` for one adapted module (what :func:`build_adapter` reads back)."""
    if isinstance(adapter, TLoRA):
        if adapter.method == "lora":
            up, down = adapter.lora_up.detach(), adapter.lora_down.detach()
            alpha = torch.tensor(adapter.scale * up.shape[1], dtype=torch.float32)
            return {"lora_up.weight": up.clone(), "lora_down.weight": down.clone(), "alpha": alpha}
        tensors = {f"tlora.{k}": v.detach().clone() for k, v in adapter.state_dict().items()}
        tensors[TLORA_MARK] = torch.tensor(adapter.scale, dtype=torch.float32)
        return tensors
    if isinstance(adapter, SODA):
        return {f"soda.{k}": v.detach().clone() for k, v in adapter.state_dict().items()}
    raise TypeError(f"no file format for {type(adapter).__name__}")


def build_adapter(weight_shape: tuple[int, ...], tensors: Mapping[str, Tensor]) -> Adapter:
    """Rebuild one module's adapter from its ``suffix → tensor`` group, frozen: it is for
    merging (and matmuls over tensors that require grad take a slower, copying path in
    PyTorch even under ``no_grad``: 3× slower merges on CPU)."""
    return _rebuild(weight_shape, tensors).requires_grad_(False)


def _rebuild(weight_shape: tuple[int, ...], tensors: Mapping[str, Tensor]) -> Adapter:
    if TLORA_MARK in tensors:
        inner = {k[len("tlora.") :]: v for k, v in tensors.items() if k.startswith("tlora.") and k != TLORA_MARK}
        return TLoRA.from_tensors(weight_shape, inner, float(tensors[TLORA_MARK]))
    if LORA_MARK in tensors:
        # a conv LoRA may be stored conv-shaped (up [out, r, 1, 1], down [r, in, kh, kw]), as ComfyUI reads it
        up, down = tensors["lora_up.weight"].flatten(1), tensors["lora_down.weight"].flatten(1)
        alpha = float(tensors["alpha"]) if "alpha" in tensors else up.shape[1]
        return TLoRA.from_tensors(weight_shape, {"lora_up": up, "lora_down": down}, alpha / up.shape[1])
    if SODA_MARK in tensors:
        inner = {k[len("soda.") :]: v for k, v in tensors.items() if k.startswith("soda.")}
        rotation = "stiefel" if "rotation.0" in inner else "cayley" if "cayley.0" in inner else "none"
        adapter = SODA(weight_shape, soda_preset("svdiff" if rotation == "none" else "soda", rotation=rotation))
        try:
            adapter.load_state_dict(inner)
        except RuntimeError as err:
            raise ValueError(f"SODA tensors do not fit a layer weight of shape {tuple(weight_shape)}: {err}") from None
        return adapter
    raise ValueError(f"no adapter tensors among {sorted(tensors)[:6]}")


MARKS = (TLORA_MARK, LORA_MARK, SODA_MARK)  # one per module group, naming its family
TLORA_INDEXED = ("transform", "residual_out", "residual_in")
TLORA_FIXED = ("lora_up", "lora_down")


SODA_INDEXED = ("rotation", "cayley")
SODA_FIXED = ("delta",)


def _probe(tensors, module, mark, namespace, fixed, indexed) -> dict[str, Tensor] | None:
    """``module``'s ``suffix → tensor`` group of one family, found by probing the family's
    known suffixes: constant time in the file's size, as a loader calling it per model key needs."""
    if f"{module}.{mark}" not in tensors:
        return None
    group = {mark: tensors[f"{module}.{mark}"]}
    for name in fixed:
        if f"{module}.{namespace}.{name}" in tensors:
            group[f"{namespace}.{name}"] = tensors[f"{module}.{namespace}.{name}"]
    for name in indexed:
        d = 0
        while f"{module}.{namespace}.{name}.{d}" in tensors:
            group[f"{namespace}.{name}.{d}"] = tensors[f"{module}.{namespace}.{name}.{d}"]
            d += 1
    return group


def tlora_group(tensors: Mapping[str, Tensor], module: str) -> dict[str, Tensor] | None:
    """The TLoRA-family group of ``module`` in a file's tensors, or None."""
    return _probe(tensors, module, TLORA_MARK, "tlora", TLORA_FIXED, TLORA_INDEXED)


def soda_group(tensors: Mapping[str, Tensor], module: str) -> dict[str, Tensor] | None:
    """The SODA group of ``module`` in a file's tensors, or None."""
    return _probe(tensors, module, SODA_MARK, "soda", SODA_FIXED, SODA_INDEXED)


def group_by_module(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split a file's keys into ``module → {suffix → tensor}``, using each group's marker key.
    Keys that belong to no marked group are returned under the module ``""``."""
    groups: dict[str, dict[str, Tensor]] = {
        key[: -len(mark) - 1]: {} for key in tensors for mark in MARKS if key.endswith("." + mark)
    }
    stray: dict[str, Tensor] = {}
    for key, value in tensors.items():
        head = key.rpartition(".")[0]  # the longest marked module name that prefixes the key
        while head and head not in groups:
            head = head.rpartition(".")[0]
        if head:
            groups[head][key[len(head) + 1 :]] = value
        else:
            stray[key] = value
    if stray:
        groups[""] = stray
    return groups


def module_tensors(adapters: Mapping[str, Adapter]) -> dict[str, Tensor]:
    """``module → adapter`` as a file's (or ComfyUI's LORA_MODEL's) ``<module>.<suffix>`` tensors."""
    return {f"{module}.{suffix}": t for module, a in adapters.items() for suffix, t in adapter_tensors(a).items()}


def save_adapters(
    path: str | os.PathLike,
    adapters: Mapping[str, Adapter],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``module → adapter`` to ``path`` atomically (see :func:`write_safetensors`), with
    the format version and a checksum in the metadata."""
    tensors = module_tensors(adapters)
    meta = {"tlora.format_version": FORMAT_VERSION, **{k: str(v) for k, v in (metadata or {}).items()}}
    meta[CHECKSUM_KEY] = checksum(tensors, meta)
    return write_safetensors(path, tensors, meta, overwrite=overwrite)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], *, overwrite: bool = False
) -> Path:
    """Atomic write: a temporary file in the same folder, fsync'd, then renamed over ``path``,
    so a crash never leaves a half-written file. Refuses to replace an existing file unless
    ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes; sorted by name) and the metadata
    other than the checksum itself: any flipped byte of a file shows."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class AdapterFile:
    """A loaded adapter file: its modules' tensor groups and its metadata."""

    path: Path
    modules: dict[str, dict[str, Tensor]]
    metadata: dict[str, str]
    stray_keys: list[str]
    tensors: dict[str, Tensor]  # every tensor of the file, as checked (what a loader applies)

    @property
    def method(self) -> str:
        return self.metadata.get("tlora.method", "unknown")


def describe(file: AdapterFile) -> dict:
    """What a person wants to know about an adapter file before applying it."""
    meta = file.metadata
    targets = meta.get("tlora.targets")
    plain_lora = all(LORA_MARK in group for group in file.modules.values())
    return {
        "file": file.path.name,
        "method": meta.get("tlora.method", "lora" if plain_lora else "unknown"),
        "parameters": sum(t.numel() for group in file.modules.values() for t in group.values() if t.ndim > 0),
        "modules": len(file.modules),
        "targets": json.loads(targets) if targets else sorted({m.rsplit(".", 1)[-1] for m in file.modules}),
        "base_model": meta.get("tlora.base_model", "unknown"),
        "steps": meta.get("tlora.steps", "unknown"),
        "transform_rank": meta.get("tlora.transform_rank"),
        "residual_rank": meta.get("tlora.residual_rank"),
        "format_version": meta.get("tlora.format_version", "none (not written by this pack)"),
    }


def load_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter file: readable, checksum intact (for files this pack wrote),
    and holding at least one adapter group. Raises :class:`AdapterFileError` saying what is
    wrong."""
    path = Path(path)
    metadata = read_metadata(path)
    tensors = load_tensors(path)
    ours = any(k.startswith("tlora.") for k in metadata)
    if CHECKSUM_KEY in metadata:
        if checksum(tensors, metadata) != metadata[CHECKSUM_KEY]:
            raise AdapterFileError(f"{path.name} is corrupt: its checksum does not match its contents. Re-export it.")
    elif ours:
        raise AdapterFileError(f"{path.name} is corrupt: it has TLoRA metadata but no checksum. Re-export it.")
    groups = group_by_module(tensors)
    stray = sorted(groups.pop("", {}))
    if not groups:
        raise AdapterFileError(
            f"{path.name} holds no TLoRA, SODA or LoRA tensors (keys like "
            f"{', '.join(stray[:3]) or 'none'}): it is not an adapter file for this node."
        )
    return AdapterFile(path, groups, metadata, stray, tensors)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file, without reading its tensors."""
    path = Path(path)
    _check_exists(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > min(100 << 20, path.stat().st_size - 8):
                raise ValueError("bad header size")
            header = json.loads(f.read(size))
        meta = header.get("__metadata__", {})
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a mapping")
        return {str(k): str(v) for k, v in meta.items()}
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise AdapterFileError(_corrupt_message(path, err)) from None


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file, with a clear :class:`AdapterFileError` for a
    missing, truncated or corrupt file."""
    path = Path(path)
    _check_exists(path)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError, RuntimeError, OverflowError) as err:
        raise AdapterFileError(_corrupt_message(path, err)) from None


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")


def _corrupt_message(path: Path, err: Exception) -> str:
    return (
        f"{path.name} is not a readable safetensors file (truncated, corrupt or another format: {err}). "
        "Re-download or re-export it."
    )
