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

from .adapters import ADAPTER_CLASSES, Adapter, LoRA

FORMAT_VERSION = "1"
CHECKSUM_KEY = "tlora.checksum"


class AdapterFileError(ValueError):
    """A file that cannot be used as an adapter file; the message says why and what to do."""


def adapter_class(group: Mapping[str, Tensor]) -> type[Adapter] | None:
    """The class whose marker key is in a module's ``suffix → tensor`` group, or None."""
    return next((cls for cls in ADAPTER_CLASSES if cls.file_mark in group), None)


def build_adapter(weight_shape: tuple[int, ...], group: Mapping[str, Tensor]) -> Adapter:
    """Rebuild one module's adapter from its ``suffix → tensor`` group, frozen: it is for
    merging (and matmuls over tensors that require grad take a slower, copying path in
    PyTorch even under ``no_grad``: 3× slower merges on CPU)."""
    cls = adapter_class(group)
    if cls is None:
        raise ValueError(f"no adapter tensors among {sorted(group)[:6]}")
    return cls.from_file_tensors(weight_shape, group).requires_grad_(False)


def group_by_module(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split a file's keys into ``module → {suffix → tensor}``, using each group's marker key.
    Keys that belong to no marked group are returned under the module ``""``."""
    marks = [cls.file_mark for cls in ADAPTER_CLASSES]
    groups: dict[str, dict[str, Tensor]] = {
        key[: -len(mark) - 1]: {} for key in tensors for mark in marks if key.endswith("." + mark)
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
    return {f"{module}.{suffix}": t for module, a in adapters.items() for suffix, t in a.file_tensors().items()}


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
    plain_lora = all(adapter_class(group) is LoRA for group in file.modules.values())
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
