"""Hostile adapter files: byte-level and structural mutations of valid files of every method.

    python bench/fuzz_files.py [--cases 10000] [--seed 0] [--methods tlora,soda,...]

For each method, a valid file (three layers: two Linear, one Conv2d, random trained-looking
weights) is mutated ``--cases`` times at the byte level (truncation, bit flips, inserted or
deleted bytes, a hostile header) and ``--cases`` times structurally (keys dropped, added or
renamed, shapes and dtypes changed, ranks of 0 or far beyond the layer, NaN/inf values, groups
moved between layers; then saved with a valid checksum, so the validator, not the checksum,
has to refuse them). Each mutated file goes the way the pack uses a file: Apply TLoRA's load
(``load_adapter_file``), the route's and TLoRA Info's header-only check (``inspect_adapter_file``),
then every module rebuilt for its layer and its weight change computed (``build_adapter``,
``finite_delta``), as Apply TLoRA, the registered ComfyUI adapter and export do.

A case is *refused* (an ``AdapterFileError`` naming the file, or Apply's "no such layer") or
*accepted* (every module built, every value of the file and of ΔW finite). Anything else is a
*crash*; an accepted file with a non-finite value is *non-finite*; the two loaders disagreeing
is a *disagreement*. All three must be 0. The peak RSS and the slowest case bound the memory
and time one hostile file can cost. Figures: docs/format.md, "Validation". The CI test
(tests/test_fuzz.py) runs the same code on fewer cases.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from tlora import PRESETS, SODA, soda_preset
from tlora.adapters import METHODS as METHOD_CLASSES
from tlora.format import (
    AdapterFileError,
    build_adapter,
    checksum,
    finite_delta,
    inspect_adapter_file,
    load_adapter_file,
    module_tensors,
)
from tlora.validate import DTYPES as FILE_DTYPES

METHODS = ("tlora", "tlora_star", "transform", "residual", "lora", "soda", "svdiff")
LAYERS = {  # module → layer weight shape: small, so that thousands of cases take seconds
    "diffusion_model.block.attn.to_q": (16, 16),
    "diffusion_model.block.attn.to_k": (16, 24),
    "diffusion_model.block.conv": (8, 4, 3, 3),
}
HOSTILE_HEADERS = (
    b"[]",
    b'"adapter"',
    b"null",
    b"1e999",
    b"{" * 100_000,
    b'{"a":' * 50_000 + b"{}" + b"}" * 50_000,
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}',
    b'{"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "F32", "shape": [1e3], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}',
    b'{"__metadata__": {"tlora.method": 1}}',
    b'{"__metadata__": [], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "F32", "shape": [0, 1500, 1500], "data_offsets": [0, 0]}}',
    b"\xff\xfe{}",
)
SUFFIX_JUNK = ("tlora.lora_mid", "lora_mid.weight", "soda.extra", "tlora.transform.x", "alpha", "tlora.transform.01")
SAFETENSORS_DTYPES = {dtype: name for name, dtype in FILE_DTYPES.items()}
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None  # memory-backed: the cases are I/O-bound
DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8)


@dataclass
class Tally:
    """Outcomes of a method's cases, with the worst cost of any one case."""

    outcomes: Counter = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    slowest_s: float = 0.0

    def add(self, kind: str, outcome: str, seconds: float, detail: str = "") -> None:
        self.outcomes[(kind, outcome)] += 1
        self.slowest_s = max(self.slowest_s, seconds)
        if outcome in ("crash", "non-finite", "disagreement") and len(self.crashes) < 20:
            self.crashes.append(f"{kind}: {detail}")

    def count(self, outcome: str, kind: str | None = None) -> int:
        return sum(n for (k, o), n in self.outcomes.items() if o == outcome and kind in (None, k))


def good_file(method: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """A valid file of ``method`` on LAYERS: its tensors, its metadata and the layers' base weights."""
    gen = torch.Generator().manual_seed(seed)
    weights = {m: torch.randn(shape, generator=gen) / 4 for m, shape in LAYERS.items()}
    adapters = {}
    for module, shape in LAYERS.items():
        if method in ("soda", "svdiff"):
            adapter = SODA(shape, soda_preset(method))
            adapter.bind(weights[module])
        else:
            adapter = METHOD_CLASSES[method](shape, PRESETS[method])
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        adapters[module] = adapter
    metadata = {"tlora.method": method, "tlora.format_version": "1", "tlora.steps": "10"}
    return module_tensors(adapters), metadata, weights


def serialized(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, with_checksum: bool = True) -> bytes:
    """A safetensors file's bytes (the layout ``safetensors.torch.save`` writes; built here
    directly, many times faster for thousands of small files)."""
    meta = dict(metadata)
    if with_checksum:
        meta["tlora.checksum"] = checksum(tensors, meta)
    header: dict = {"__metadata__": meta}
    chunks, offset = [], 0
    for name, t in tensors.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


# -- byte level --------------------------------------------------------------------------------------------


def byte_mutation(data: bytes, rng: random.Random) -> bytes:
    """One byte-level mutation of a serialized file."""
    out = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little")
    kind = rng.randrange(7)
    if kind == 0:  # truncated anywhere
        return bytes(out[: rng.randrange(len(out))])
    if kind == 1:  # bit flips anywhere
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # bit flips in the header (its JSON and its size)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
    elif kind == 3:  # bytes inserted or deleted
        pos = rng.randrange(len(out))
        if rng.random() < 0.5:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del out[pos : pos + rng.randint(1, 8)]
    elif kind == 4:  # the header size field rewritten
        out[:8] = rng.choice([0, 1, len(out), 2**63, header_end - 9, rng.randrange(2**40)]).to_bytes(8, "little")
    elif kind == 5:  # a hostile header in place of the real one, data kept
        header = rng.choice(HOSTILE_HEADERS)
        out = bytearray(len(header).to_bytes(8, "little") + header + bytes(out[header_end:]))
    else:  # a JSON edit of the header that stays valid JSON: a value swapped for another
        header = json.loads(bytes(out[8:header_end]))
        name = rng.choice([k for k in header if k != "__metadata__"])
        field_name = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field_name] = rng.choice([[], [0], [1, 2], "F16", "I64", [2**62], [-1, 4], None, {"a": 1}])
        raw = json.dumps(header).encode()
        out = bytearray(len(raw).to_bytes(8, "little") + raw + bytes(out[header_end:]))
    return bytes(out)


# -- structural ---------------------------------------------------------------------------------------------


def structural_mutation(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], rng: random.Random
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One structural mutation of a file's tensors (or metadata); saved with a valid checksum."""
    t = dict(tensors)  # each mutation makes new tensors: the good file's stay as they are
    meta = dict(metadata)
    key = rng.choice(sorted(t))
    module = next(m for m in LAYERS if key.startswith(m + "."))
    kind = rng.randrange(12)
    if kind == 0:  # a key dropped
        del t[key]
    elif kind == 1:  # an unknown key added to a group
        t[f"{module}.{rng.choice(SUFFIX_JUNK)}"] = torch.randn(rng.randint(1, 4), 4)
    elif kind == 2:  # an index added past the end, or a gap
        base = key.rpartition(".")[0] if key.rpartition(".")[2].isdigit() else key
        t[f"{base}.{rng.choice([3, 4, 7])}"] = t[key].clone()
    elif kind == 3:  # another family's key in the group (a second marker, or a LoRA factor)
        extra = rng.choice(["tlora.scale", "lora_up.weight", "soda.base_fingerprint", "tlora.lora_up", "soda.delta"])
        t[f"{module}.{extra}"] = torch.ones(16, 2) if "up" in extra else torch.tensor(1)
    elif kind == 4:  # a shape changed: transposed, flattened, a size added or changed
        v = t[key]
        choices = [v.reshape(-1), v.unsqueeze(0), v.reshape(*v.shape, 1)]
        if v.ndim >= 2:
            choices.append(v.transpose(0, 1).contiguous())
        shape = list(v.shape) or [1]
        shape[rng.randrange(len(shape))] = rng.choice([1, 2, 3, 5, 40])
        choices.append(torch.randn(shape))
        t[key] = rng.choice(choices)
    elif kind == 5:  # a rank of 0, or one far beyond the layer (the zero-size core that cost GB)
        v = t[key]
        shape = list(v.shape) or [1]
        i = rng.randrange(len(shape))
        shape[i] = 0
        if len(shape) > 1:
            shape[(i + 1) % len(shape)] = rng.choice([1500, 50_000])
        t[key] = torch.zeros(shape)
    elif kind == 6:  # a dtype changed
        t[key] = t[key].to(rng.choice(DTYPES))
    elif kind == 7:  # NaN or inf somewhere
        v = t[key].float().clone()
        if v.numel():
            v.view(-1)[rng.randrange(v.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        t[key] = v.to(t[key].dtype) if t[key].is_floating_point() else v
    elif kind == 8:  # huge finite values (an overflow when merged)
        t[key] = t[key].float() * rng.choice([1e30, 3e38, 6e4]) if t[key].is_floating_point() else t[key] + 2**62
    elif kind == 9:  # a group moved onto another layer (a shape mismatch)
        other = rng.choice([m for m in LAYERS if m != module])
        for k in [k for k in t if k.startswith(module + ".")]:
            t[other + k[len(module) :]] = t.pop(k)
    elif kind == 10:  # a scalar becomes a vector, or a vector a scalar
        v = t[key]
        t[key] = v.reshape(-1)[:1].repeat(rng.choice([1, 2])) if v.ndim == 0 else v.reshape(-1)[0].clone()
    else:  # metadata: checksum dropped (with tlora.* metadata) or a bad step count
        if rng.random() < 0.5:
            return t, {**meta, "tlora.no_checksum": "1", "_drop_checksum": "1"}
        meta["tlora.steps"] = rng.choice(["-1", "ten", "1e9", ""])
    return t, meta


# -- one case ---------------------------------------------------------------------------------------------


def outcome(path: Path, weights: dict[str, torch.Tensor]) -> tuple[str, str]:
    """``(outcome, detail)`` of one file: refused, accepted, non-finite or disagreement. A crash
    (any other exception) propagates."""
    loaded = inspected = None
    try:
        loaded = load_adapter_file(path)
    except AdapterFileError as err:
        refused_load = err
    with contextlib.suppress(AdapterFileError):
        inspected = inspect_adapter_file(path)
    if (loaded is None) != (inspected is None):
        return "disagreement", f"load {'refused' if loaded is None else 'accepted'}, inspect the other"
    if loaded is None:
        assert path.name in str(refused_load), refused_load
        return "refused", str(refused_load)
    if any(t.is_floating_point() and not torch.isfinite(t.float()).all() for t in loaded.tensors.values()):
        return "non-finite", "a file with NaN/inf values was accepted"
    for module, group in loaded.modules.items():
        if module not in weights:
            return "refused", f"{module}: no such layer"  # Apply TLoRA's check_fit refuses it
        try:
            adapter = build_adapter(weights[module].shape, group, f"{path.name}: {module}")
            if isinstance(adapter, SODA):
                adapter.bind(weights[module], on_mismatch="ignore")  # ComfyUI's loader only warns
            with torch.no_grad():
                finite_delta(adapter, weights[module], f"{path.name}: {module}")
        except AdapterFileError as err:
            return "refused", str(err)
    return "accepted", ""


def run_case(kind: str, data: bytes, path: Path, weights: dict[str, torch.Tensor], tally: Tally) -> None:
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        result, detail = outcome(path, weights)
    except Exception as err:  # a crash: what the validator exists to prevent
        result = "crash"
        detail = f"{type(err).__name__}: {err} | {traceback.format_exc(limit=-2).splitlines()[-3:]}"
    tally.add(kind, result, time.perf_counter() - start, detail)


def fuzz_method(method: str, cases: int, seed: int, folder: Path) -> Tally:
    """``cases`` byte-level and ``cases`` structural mutations of a valid ``method`` file."""
    rng = random.Random(f"{seed}:{method}")
    tensors, metadata, weights = good_file(method, seed)
    good = serialized(tensors, metadata)
    path = folder / f"{method}.safetensors"
    tally = Tally()
    for _ in range(cases):
        run_case("byte", byte_mutation(good, rng), path, weights, tally)
    for _ in range(cases):
        mutated, meta = structural_mutation(tensors, metadata, rng)
        drop = meta.pop("_drop_checksum", None) is not None
        run_case("structural", serialized(mutated, meta, with_checksum=not drop), path, weights, tally)
    return tally


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="mutations per method and kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rss_before = peak_rss_mb()
    print("| method | cases | refused | accepted | crashes | non-finite accepted | disagreements | slowest case |")
    print("|---|---|---|---|---|---|---|---|")
    failures = 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
        for method in args.methods.split(","):
            tally = fuzz_method(method, args.cases, args.seed, Path(folder))
            bad = tally.count("crash") + tally.count("non-finite") + tally.count("disagreement")
            failures += bad
            print(
                f"| {method} | {2 * args.cases} | {tally.count('refused')} | {tally.count('accepted')} | "
                f"{tally.count('crash')} | {tally.count('non-finite')} | {tally.count('disagreement')} | "
                f"{tally.slowest_s * 1000:.0f} ms |",
                flush=True,
            )
            for line in tally.crashes:
                print("    ", line)
    print(
        f"\n{time.perf_counter() - start:.0f} s; peak RSS {peak_rss_mb():.0f} MB "
        f"({peak_rss_mb() - rss_before:.0f} MB above the start)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
