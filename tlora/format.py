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
(``modelspec.*`` and ``tlora.*``, strings) is for people and tools. Writes are atomic. Nothing is
built from a file before :mod:`tlora.validate` has checked it (:func:`load_adapter_file`,
:func:`inspect_adapter_file`, :func:`build_adapter`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapters import ADAPTER_CLASSES, Adapter, LoRA
from .validate import (
    AdapterFileError,
    Header,
    TensorEntry,
    adapter_class,
    check_finite,
    check_group,
    non_finite_message,
    read_header,
    unreadable_message,
)

FORMAT_VERSION = "1"
CHECKSUM_KEY = "tlora.checksum"
SCAN_CHUNK_BYTES = 1 << 20  # what streaming a file's tensors holds in memory at once
# write_safetensors' temporaries: mkstemp's ".<name>." + 8 random characters + ".tmp"
TEMPORARY_NAME = r"\.{name}\.[a-z0-9_]{{8}}\.tmp"
Group = TypeVar("Group", Tensor, TensorEntry)


def build_adapter(weight_shape: tuple[int, ...], group: Mapping[str, Tensor], where: str = "") -> Adapter:
    """Rebuild one module's adapter from its ``suffix → tensor`` group, frozen: it is for
    merging (and matmuls over tensors that require grad take a slower, copying path in
    PyTorch even under ``no_grad``: 3× slower merges on CPU). The group is checked first
    (keys, shapes against ``weight_shape``, ranks, finite values): a bad one raises
    :class:`AdapterFileError` prefixed with ``where`` (file and module) before anything is built."""
    cls = check_group(group, tuple(weight_shape), where)
    check_finite(group, where)
    return cls.from_file_tensors(weight_shape, group).requires_grad_(False)


def finite_delta(adapter: Adapter, weight: Tensor, where: str = "") -> Tensor:
    """``W' − W`` in fp32 (:meth:`~tlora.adapters.Adapter.delta_weight`), refused with an
    :class:`AdapterFileError` unless finite: finite factors can still overflow a merge."""
    return checked_delta(adapter.delta_weight(weight), weight, where)


def checked_delta(delta: Tensor, weight: Tensor, where: str = "") -> Tensor:
    """``delta`` (a merge's ``W' − W`` for ``weight``), refused as :func:`finite_delta` refuses."""
    if not bool(torch.isfinite(delta).all()):
        problem = f"its weight change is not finite on this layer (values of {weight.dtype} overflow)"
        raise AdapterFileError(f"{where}: {problem}" if where else problem)
    return delta


def group_by_module(tensors: Mapping[str, Group]) -> dict[str, dict[str, Group]]:
    """Split a file's keys into ``module → {suffix → tensor}``, using each group's marker key.
    Keys that belong to no marked group are returned under the module ``""``."""
    marks = [cls.file_mark for cls in ADAPTER_CLASSES]
    groups: dict[str, dict[str, Group]] = {
        key[: -len(mark) - 1]: {} for key in tensors for mark in marks if key.endswith("." + mark)
    }
    stray: dict[str, Group] = {}
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
    remove_stale_temporaries(path)
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


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries an interrupted :func:`write_safetensors` of ``path`` left behind
    (a kill between the write and the rename); only names of that exact pattern. Returns them."""
    pattern = re.compile(TEMPORARY_NAME.format(name=re.escape(path.name)))
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if pattern.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes; sorted by name) and the metadata
    other than the checksum itself: any flipped byte of a file shows."""
    digest = _metadata_digest(metadata)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _metadata_digest(metadata: Mapping[str, str]):
    """The checksum's digest after the metadata, before the tensors (see :func:`checksum`)."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest


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


@dataclass
class AdapterHeader:
    """An adapter file checked without loading it: its modules' header entries (shape, dtype,
    offsets) and its metadata (:func:`inspect_adapter_file`)."""

    path: Path
    modules: dict[str, dict[str, TensorEntry]]
    metadata: dict[str, str]
    stray_keys: list[str]


def describe(file: AdapterFile | AdapterHeader) -> dict:
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
    """Read and check an adapter file (:mod:`tlora.validate`): a safetensors header of the
    format's layout, every module's group one of its class's with consistent shapes and
    bounded ranks (checked before any tensor is read), the checksum intact (files this pack
    wrote), every value finite. Raises :class:`AdapterFileError` saying what is wrong."""
    path = Path(path)
    header = read_header(path)
    _checked_groups(path, header)
    tensors = load_tensors(path)
    if {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} != {
        k: (e.shape, e.dtype) for k, e in header.entries.items()
    }:  # replaced between the two reads: what was checked is not what was loaded
        raise AdapterFileError(f"{path.name} changed while it was read; try again")
    if CHECKSUM_KEY in header.metadata and checksum(tensors, header.metadata) != header.metadata[CHECKSUM_KEY]:
        raise AdapterFileError(_checksum_message(path))
    groups = group_by_module(tensors)
    stray = sorted(groups.pop("", {}))
    try:
        check_finite(tensors)
    except AdapterFileError:  # name the module
        for module, group in groups.items():
            check_finite(group, f"{path.name}: {module}")
        check_finite({k: tensors[k] for k in stray}, path.name)
    return AdapterFile(path, groups, header.metadata, stray, tensors)


def inspect_adapter_file(path: str | os.PathLike) -> AdapterHeader:
    """The checks of :func:`load_adapter_file` without loading the file: the header is read,
    then the tensors' bytes are streamed (``SCAN_CHUNK_BYTES`` at a time) through the checksum
    and a finiteness test. Memory stays a few MB whatever the file's size."""
    path = Path(path)
    header = read_header(path)
    groups, stray = _checked_groups(path, header)
    digest = _metadata_digest(header.metadata) if CHECKSUM_KEY in header.metadata else None
    try:
        non_finite = _scan(path, header, digest)
    except (OSError, ValueError) as err:
        raise AdapterFileError(unreadable_message(path, err)) from None
    if digest is not None and digest.hexdigest() != header.metadata[CHECKSUM_KEY]:
        raise AdapterFileError(_checksum_message(path))
    if non_finite is not None:
        name, count = non_finite
        owner = {f"{m}.{suffix}": m for m, group in groups.items() for suffix in group}.get(name)
        where, key = (f"{path.name}: {owner}", name[len(owner) + 1 :]) if owner else (path.name, name)
        raise AdapterFileError(f"{where}: {non_finite_message(key, count)}")
    return AdapterHeader(path, groups, header.metadata, stray)


def _checked_groups(path: Path, header: Header) -> tuple[dict[str, dict[str, TensorEntry]], list[str]]:
    """The header's module groups once each is checked (:func:`tlora.validate.check_group`),
    and the keys outside any group."""
    if CHECKSUM_KEY not in header.metadata and any(k.startswith("tlora.") for k in header.metadata):
        raise AdapterFileError(f"{path.name} is corrupt: it has TLoRA metadata but no checksum. Re-export it.")
    groups = group_by_module(header.entries)
    stray = sorted(groups.pop("", {}))
    if not groups:
        raise AdapterFileError(
            f"{path.name} holds no TLoRA, SODA or LoRA tensors (keys like "
            f"{', '.join(stray[:3]) or 'none'}): it is not an adapter file for this node."
        )
    for module, group in groups.items():
        check_group(group, None, f"{path.name}: {module}")
    return groups, stray


def _checksum_message(path: Path) -> str:
    return f"{path.name} is corrupt: its checksum does not match its contents. Re-export it."


def _scan(path: Path, header: Header, digest) -> tuple[str, int] | None:
    """Stream every tensor's bytes, sorted by name, into ``digest`` (when given) after its
    ``name|dtype|shape|`` line, as :func:`checksum` hashes them; returns the first tensor
    holding NaN or infinite values and how many, or None."""
    buffer = bytearray(SCAN_CHUNK_BYTES)
    view = memoryview(buffer)
    non_finite = None
    with open(path, "rb") as f:
        for name in sorted(header.entries):
            entry = header.entries[name]
            if digest is not None:
                digest.update(f"{name}|{entry.dtype}|{entry.shape}|".encode())
            f.seek(entry.start)
            remaining = entry.end - entry.start
            while remaining:
                size = min(SCAN_CHUNK_BYTES, remaining)  # a multiple of the item size (≤ 8 bytes)
                if f.readinto(view[:size]) != size:
                    raise ValueError(f"{path.name} changed while it was read")
                if digest is not None:
                    digest.update(view[:size])
                if entry.dtype.is_floating_point and (non_finite is None or non_finite[0] == name):
                    values = torch.frombuffer(buffer, dtype=entry.dtype, count=size // entry.dtype.itemsize)
                    count = int((~torch.isfinite(values if entry.dtype.itemsize > 1 else values.float())).sum())
                    if count:
                        non_finite = (name, count + (non_finite[1] if non_finite else 0))
                remaining -= size
    return non_finite


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file (its header checked), without reading its tensors."""
    return read_header(path).metadata


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file, with a clear :class:`AdapterFileError` for a
    missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError, RuntimeError, OverflowError) as err:
        raise AdapterFileError(unreadable_message(path, err)) from None
