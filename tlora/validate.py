"""One validation pass for adapter files, before anything is built from them (docs/format.md, "Validation").

Three levels, each raising :class:`AdapterFileError` with the file, the module and the problem:

- :func:`read_header`: the safetensors header alone: bounded size, a JSON object (parsing
  bounded in depth), one entry per tensor with a known dtype, a shape and offsets that tile the
  data exactly; string metadata. Nothing of the tensors is read.
- :func:`check_group`: one module's group: exactly the keys of one layout its class declares
  (``file_layouts``), then the class's own dtype and shape rules (``check_file_tensors``): sizes
  ≥ 1, orders and ranks consistent, ranks bounded by the layer's width, and the layer's shape when
  it is known. Reads shapes and dtypes only, so header entries and tensors both pass, and a rank
  that would cost gigabytes to build is refused before anything is allocated.
- :func:`check_finite`: every floating-point value of a group is finite (needs the data).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapters import ADAPTER_CLASSES, Adapter

MAX_HEADER_BYTES = 8 << 20  # an SDXL adapter on every layer, text encoders included, needs ~2 MB
MAX_HEADER_DEPTH = 3  # {name: {"shape": [...]}}: what safetensors defines; deeper is refused
MAX_NAME_CHARS = 1024  # a tensor's name (module names are ~100 characters)
METADATA_KEY = "__metadata__"
ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
# safetensors dtype names → torch dtypes (those this torch has)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
    }.items()
    if hasattr(torch, attr)
}
_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")  # an indexed key's index: no sign, no leading zero


class AdapterFileError(ValueError):
    """A file that cannot be used as an adapter file; the message says why and what to do."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its header describes it: dtype, shape and where its bytes lie in the file
    (``start``/``end``: absolute offsets). Has the ``shape``/``dtype``/``ndim``/``numel`` a
    :class:`~torch.Tensor` has, so shape checks and :func:`tlora.format.describe` take either."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: its metadata and its tensors' entries, by name."""

    metadata: dict[str, str]
    entries: dict[str, TensorEntry]


def read_header(path: str | os.PathLike) -> Header:
    """The checked header of a safetensors file (the layout the format defines, nothing more);
    reads at most ``8 + MAX_HEADER_BYTES`` bytes. Raises :class:`AdapterFileError`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{file_size} bytes: too short for a header")
            size = int.from_bytes(prefix, "little")
            if size < 2 or size > min(MAX_HEADER_BYTES, file_size - 8):
                raise ValueError(f"header size {size} outside 2..{min(MAX_HEADER_BYTES, max(file_size - 8, 0))}")
            raw = f.read(size)
        header = _parse_json(raw)
        return _checked_header(header, data_size=file_size - 8 - size, data_start=8 + size)
    except (ValueError, OSError, RecursionError) as err:
        raise AdapterFileError(unreadable_message(path, err)) from None


def unreadable_message(path: Path, err: Exception) -> str:
    return (
        f"{path.name} is not a readable safetensors file (truncated, corrupt or another format: {err}). "
        "Re-download or re-export it."
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice in the header")
    return out


def _parse_json(raw: bytes) -> Any:
    """The header's JSON. A nesting deeper than the interpreter's recursion limit is a
    RecursionError (refused by the caller); anything deeper than MAX_HEADER_DEPTH is refused
    by the structure checks."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"header is not UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("header is nested too deeply") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"header is not JSON ({err.msg} at {err.pos})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_header(header: Any, data_size: int, data_start: int) -> Header:
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{METADATA_KEY} must map names to strings")
    entries: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(f"a tensor name of {len(name)} characters (at most {MAX_NAME_CHARS})")
        if not isinstance(entry, dict) or set(entry) != ENTRY_FIELDS:
            raise ValueError(f"tensor {name!r}: expected an object with {sorted(ENTRY_FIELDS)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise ValueError(f"tensor {name!r}: shape must be a list of sizes ≥ 0, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ValueError(f"tensor {name!r}: data_offsets must be two integers, got {offsets!r}")
        begin, end = offsets
        torch_dtype = DTYPES[dtype]
        nbytes = math.prod(shape) * torch_dtype.itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise ValueError(f"tensor {name!r}: offsets {offsets} do not hold {shape} of {dtype} ({nbytes} bytes)")
        entries[name] = TensorEntry(torch_dtype, tuple(shape), data_start + begin, data_start + end)
    position = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            raise ValueError(f"tensor {name!r} does not start where the previous one ends (overlap or gap)")
        position = entry.end
    if position != data_start + data_size:
        raise ValueError(f"the tensors hold {position - data_start} bytes, the file {data_size} after its header")
    return Header(dict(metadata), entries)


# -- one module's group -----------------------------------------------------------------------------


def adapter_class(group: Mapping[str, Any]) -> type[Adapter] | None:
    """The class whose marker key is in a module's ``suffix → tensor`` group, or None."""
    return next((cls for cls in ADAPTER_CLASSES if cls.file_mark in group), None)


def layout_of(cls: type[Adapter], keys: Iterable[str]) -> tuple[str, ...]:
    """The one of ``cls.file_layouts`` that ``keys`` (a group's suffixes) form exactly: the
    marker, each fixed name once, each indexed name as ``<name>.0 … <name>.<D−1>`` (D ≥ 1).
    Raises ValueError naming the unexpected, missing or mismatched keys."""
    names: set[str] = set()
    indices: dict[str, set[int]] = {}
    unexpected = []
    for key in keys:
        if key == cls.file_mark:
            continue
        rest = key[len(cls.file_prefix) :] if key.startswith(cls.file_prefix) else None
        base, _, index = (rest or "").rpartition(".")
        if rest in cls.file_fixed:
            names.add(rest)
        elif base in cls.file_indexed and _INDEX.fullmatch(index):
            indices.setdefault(base, set()).add(int(index))
            names.add(base)
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"unexpected key{'s' * (len(unexpected) > 1)} {', '.join(sorted(unexpected)[:4])}")
    for base, found in indices.items():
        missing = sorted(set(range(max(found) + 1)) - found)
        if missing:
            raise ValueError(f"missing {cls.file_prefix}{base}.{missing[0]} (have indices {sorted(found)[:8]})")
    for layout in cls.file_layouts:
        if names == set(layout):
            return layout
    near = min(cls.file_layouts, key=lambda layout: (len(set(layout) ^ names), len(names - set(layout))))
    missing = sorted(set(near) - names)
    extra = sorted(names - set(near))
    problem = [f"missing {', '.join(cls.file_prefix + n for n in missing)}"] if missing else []
    problem += [f"{', '.join(cls.file_prefix + n for n in extra)} cannot be combined with the rest"] if extra else []
    return _raise(f"not a {cls.__name__} group: {'; '.join(problem)}")


def _raise(message: str):
    raise ValueError(message)


def check_group(
    group: Mapping[str, Any], weight_shape: tuple[int, ...] | None = None, where: str = ""
) -> type[Adapter]:
    """The class of ``group`` (``suffix → tensor or header entry``) once its keys, dtypes and
    shapes are one of its class's layouts (and fit a layer weight of ``weight_shape``, when
    given). Raises :class:`AdapterFileError` prefixed with ``where`` (file and module)."""
    cls = adapter_class(group)
    try:
        if cls is None:
            raise ValueError(f"no adapter marker key among {sorted(group)[:4]}")
        layout_of(cls, group)
        for key, value in group.items():
            if 0 in tuple(value.shape):
                raise ValueError(f"{key} is empty (shape {list(value.shape)})")
        cls.check_file_tensors(group, None if weight_shape is None else tuple(int(s) for s in weight_shape))
    except ValueError as err:
        raise AdapterFileError(f"{where}: {err}" if where else str(err)) from None
    return cls


def check_finite(tensors: Mapping[str, Tensor], where: str = "") -> None:
    """Refuse NaN or infinite values in any floating-point tensor of ``tensors`` (one fused
    reduction over them all; the culprit is looked for only when there is one)."""
    floats = {k: t if t.itemsize > 1 else t.float() for k, t in tensors.items() if t.is_floating_point()}
    if all_finite(floats.values()):
        return
    key, t = next((k, t) for k, t in floats.items() if not bool(torch.isfinite(t).all()))
    message = non_finite_message(key, int((~torch.isfinite(t)).sum()))
    raise AdapterFileError(f"{where}: {message}" if where else message)


def non_finite_message(key: str, count: int) -> str:
    return f"{key} holds {count} NaN or infinite value{'s' * (count > 1)}: the file is broken"


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every value of every tensor is finite, in one fused reduction: the max-abs norm
    of each tensor (NaN and inf propagate; finite values cannot overflow), then one host sync."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    with torch.no_grad():  # no per-tensor detach: one op each, a kernel launch on a GPU
        norms = torch._foreach_norm(tensors, math.inf)
        return bool(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]).isfinite().all())
