"""Time to patch every attention layer of a real-shaped SD1.5 and SDXL UNet: TLoRA vs LoRA.

    python bench/merge_speed.py [--repeats 5] [--sdxl-repeats 1] [--models SD1.5,SDXL]
    /path/to/ComfyUI/venv/bin/python bench/merge_speed.py --comfyui /path/to/ComfyUI

"Patching" is what ComfyUI does per weight when it loads a patched model: take the stored
fp16 weight, make an fp32 copy, add ``strength · (W' − W)``, cast back to fp16 into the
weight. The to_q/k/v/out weights of every transformer block (``bench/shapes.py``) are held in
fp16 and patched one by one, so only one layer's fp32 temporaries exist at a time.

- core-only (default, no ComfyUI): the file's tensors (``Adapter.file_tensors``) are
  grouped per module, each module's adapter is rebuilt (``build_adapter``, as the pack's
  ComfyUI adapter does on first use) and ``W' − W`` comes from a ``GroupedMerge`` (as in the
  pack's ComfyUI adapter: same-shaped layers' factors built in one batched pass) or, in the
  "per layer" diagnostic row, from each ``adapter.delta_weight`` alone;
- ``--comfyui PATH``: the same tensors go through ComfyUI's own ``comfy.lora.load_lora`` (with
  the pack imported as ComfyUI imports it, so its adapters are registered) and each weight
  through ``comfy.lora.calculate_weight`` exactly as ``ModelPatcher.patch_weight_to_device``
  calls it. LoRA then runs on ComfyUI's stock ``LoRAAdapter``.

Each pass starts from the file's tensors: "load" is grouping them per module (core) or
``load_lora`` (ComfyUI); "patch" is every weight's patch, including the lazy rebuild of each
module's adapter from its tensors, as the pack's ComfyUI adapter does on first use. Passes
alternate between the adapters to spread load noise; SD1.5 reports the median of
``--repeats`` passes after a warm-up pass, SDXL ``--sdxl-repeats`` passes after a warm-up on
one layer per shape. Target: TLoRA ≤ 2× LoRA (total time). A "floor" line then bounds what
any implementation could reach here: the merge's arithmetic (``tlora.cost.merge_macs``) at
this machine's large-matmul rate, measured in the same run, plus the patcher's own fp32 copy
and cast back of every weight, timed alone. On a busy 2-core machine
``--threads 1`` gives steadier figures (OpenMP threads wait on each other). Last, a
subprocess measures the peak extra memory of merging one 10240→1280 (feed-forward sized)
weight: its in×in T would be 400 MiB in fp32 and is never built.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from shapes import MODELS  # noqa: E402

PACK_MODULE = "comfyui_tlora"
TARGET = 2.0  # TLoRA patch time ≤ TARGET × LoRA's
STRENGTH = 0.8
NOISE = 1e-2  # relative perturbation of every adapter tensor, as training would leave it
PAIRS = {  # model: [(label, preset name, overrides)]; the first is TLoRA, the rest LoRAs
    "SD1.5": [
        ("TLoRA(2,6)", "tlora", {"transform_rank": 2, "residual_rank": 6}),
        ("LoRA r=2", "lora", {"residual_rank": 2}),
        ("LoRA r=4", "lora", {"residual_rank": 4}),
    ],
    "SDXL": [
        ("TLoRA(1,2)", "tlora", {"transform_rank": 1, "residual_rank": 2}),
        ("LoRA r=1", "lora", {"residual_rank": 1}),
    ],
}
PROBE_SHAPE = (1280, 10240)  # [out, in]
PROBE_ROWS = [("TLoRA(2,6)", "tlora", {"transform_rank": 2, "residual_rank": 6})] + PAIRS["SDXL"]


# -- the two ways of patching ---------------------------------------------------------------
def core_namespace(comfyui: Path | None) -> SimpleNamespace:
    """``TLoRA``, ``preset`` and the ``format`` module: from the pack imported the way
    ComfyUI imports it (``--comfyui``), else from the repo's ``tlora`` package."""
    if comfyui is None:
        sys.path.insert(0, str(REPO))
        from tlora import TLoRA, batched_merge, cost, format, preset

        return SimpleNamespace(TLoRA=TLoRA, preset=preset, format=format, cost=cost, batched_merge=batched_merge)
    adapters = importlib.import_module(f"{PACK_MODULE}.tlora.adapters.tlora")
    fmt = importlib.import_module(f"{PACK_MODULE}.tlora.format")
    cost = importlib.import_module(f"{PACK_MODULE}.tlora.cost")
    batched_merge = importlib.import_module(f"{PACK_MODULE}.tlora.batched_merge")
    return SimpleNamespace(
        TLoRA=adapters.TLoRA, preset=adapters.preset, format=fmt, cost=cost, batched_merge=batched_merge
    )


def import_comfyui(path: Path) -> SimpleNamespace:
    """ComfyUI's core on CPU, then this repo as the custom node package ``comfyui_tlora``
    (through the pack's one host loader, tools/comfyui_host.py)."""
    sys.path.insert(0, str(REPO))
    from tools import comfyui_host

    comfyui_host.boot(path, cpu=True)  # registers the pack's weight adapters
    import comfy.float
    import comfy.lora
    import comfy.model_patcher
    import comfy.weight_adapter

    registered = [a.__name__ for a in comfy.weight_adapter.adapters]
    if "TLoRAWeightAdapter" not in registered:
        raise RuntimeError(f"the pack's adapters are not registered in comfy.weight_adapter.adapters: {registered}")
    return SimpleNamespace(lora=comfy.lora, float=comfy.float, seed=comfy.model_patcher.string_to_seed)


class CorePatcher:
    """Patching with this pack's core alone."""

    mode = "core-only (tlora adapters, no ComfyUI)"

    def __init__(self, core: SimpleNamespace):
        self.core = core

    def load(self, tensors: dict, modules: list[str], per_layer: bool = False) -> dict:
        groups = self.core.format.group_by_module(tensors)
        loaded = {m: groups[m] for m in modules}
        if per_layer:
            return {"groups": loaded, "merge": None}
        merge = self.core.batched_merge.GroupedMerge()
        for m, group in loaded.items():
            signature = tuple((k, tuple(t.shape)) for k, t in group.items())
            merge.add(m, signature, lambda shape, device, g=group: self.build(shape, g, device))
        return {"groups": loaded, "merge": merge}

    def build(self, shape: tuple[int, ...], group: dict, device: torch.device):
        return self.core.format.build_adapter(tuple(shape), group).to(device)

    def patch(self, loaded: dict, module: str, weight: torch.Tensor, strength: float) -> None:
        w32 = weight.to(torch.float32, copy=True)
        merge = loaded["merge"]
        delta = None if merge is None else merge.delta(module, w32)
        if delta is None:
            delta = self.build(weight.shape, loaded["groups"][module], weight.device).delta_weight(w32)
        w32.add_(delta, alpha=strength)
        weight.copy_(w32)

    def round_trip(self, module: str, weight: torch.Tensor) -> None:
        """The patch without the adapter: the fp32 working copy and the cast back."""
        weight.copy_(weight.to(torch.float32, copy=True))


class ComfyPatcher:
    """Patching through ComfyUI's own loader and ``calculate_weight``."""

    mode = "ComfyUI (comfy.lora.load_lora + calculate_weight)"

    def __init__(self, comfy: SimpleNamespace, core: SimpleNamespace):
        self.comfy = comfy
        self.core = core
        self.not_loaded = 0
        patcher = self

        class Count(logging.Handler):
            def emit(self, record):
                if "lora key not loaded" in record.getMessage():
                    patcher.not_loaded += 1

        logging.getLogger().addHandler(Count())

    def load(self, tensors: dict, modules: list[str], per_layer: bool = False) -> dict:
        key_map = {m: f"{m}.weight" for m in modules}  # ComfyUI's generic "diffusion_model.x" mapping
        self.not_loaded = 0
        patches = self.comfy.lora.load_lora(tensors, key_map)
        if len(patches) != len(modules) or self.not_loaded:
            raise RuntimeError(
                f"ComfyUI loaded {len(patches)} of {len(modules)} modules; {self.not_loaded} keys not loaded"
            )
        if per_layer:  # the diagnostic row: each of the pack's adapters merges alone
            for adapter in patches.values():
                if getattr(adapter, "merge", None) is not None:
                    adapter.merge = None
        return patches

    def patch(self, loaded: dict, module: str, weight: torch.Tensor, strength: float) -> None:
        key = f"{module}.weight"
        temp = weight.to(torch.float32, copy=True)  # patch_weight_to_device
        out = self.comfy.lora.calculate_weight([(strength, loaded[key], 1.0, None, None)], temp, key)
        weight.copy_(self.comfy.float.stochastic_rounding(out, weight.dtype, seed=self.comfy.seed(key)))

    def round_trip(self, module: str, weight: torch.Tensor) -> None:
        """The patch without the adapter: ComfyUI's fp32 working copy and its rounding back."""
        key = f"{module}.weight"
        temp = weight.to(torch.float32, copy=True)
        weight.copy_(self.comfy.float.stochastic_rounding(temp, weight.dtype, seed=self.comfy.seed(key)))


# -- adapters and weights -------------------------------------------------------------------
def module_name(layer: str) -> str:
    return f"diffusion_model.{layer}"


def adapter_file(core, layers, method: str, overrides: dict, seed: int, device: str = "cpu") -> tuple[dict, int, int]:
    """The tensors a saved file of this adapter holds (randomized as if trained), its
    parameter count, and the multiply-accumulates of merging it into every layer."""
    config = core.preset(method, **overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors, params, macs = {}, 0, 0
    for i, (name, out, inp) in enumerate(layers):
        adapter = core.TLoRA((out, inp), config, seed=seed + i)
        with torch.no_grad():
            for p in adapter.parameters():
                scale = p.abs().mean().item() or 1.0
                p.add_(torch.randn(p.shape, generator=gen), alpha=NOISE * scale)
        params += adapter.num_parameters()
        macs += core.cost.merge_macs(adapter.cost_shape)
        file_tensors = adapter.file_tensors().items()
        tensors.update({f"{module_name(name)}.{k}": v.to(device) for k, v in file_tensors})
    return tensors, params, macs


def fp16_weights(layers, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(out, inp, generator=gen) / math.sqrt(inp)).half().to(device).contiguous()
        for name, out, inp in layers
    }


def synchronize(weights: dict[str, torch.Tensor]) -> None:
    """Wait for the GPU's queued work (timers read the host clock)."""
    if next(iter(weights.values())).is_cuda:
        torch.cuda.synchronize()


@dataclass
class Row:
    label: str
    tensors: dict
    params: int
    macs: int
    modewise: bool = False  # diagnostic: W·T always mode by mode, never through a dense T
    per_layer: bool = False  # diagnostic: each layer's factors built alone (no GroupedMerge)
    load: list[float] = field(default_factory=list)
    patch: list[float] = field(default_factory=list)

    def total(self) -> float:
        return statistics.median(a + b for a, b in zip(self.load, self.patch, strict=True))


@contextlib.contextmanager
def modewise_merge(core, on: bool):
    """Make the adapters' merge skip the dense T (``cost.dense_merge_is_cheaper`` → False)."""
    saved = core.cost.dense_merge_is_cheaper
    if on:
        core.cost.dense_merge_is_cheaper = lambda shape: False
    try:
        yield
    finally:
        core.cost.dense_merge_is_cheaper = saved


def run_pass(patcher, row: Row, layers, weights, strength: float, record: bool = True) -> None:
    modules = [module_name(name) for name, _, _ in layers]
    with torch.no_grad(), modewise_merge(patcher.core, row.modewise):
        start = time.perf_counter()
        loaded = patcher.load(row.tensors, modules, row.per_layer)
        load = time.perf_counter() - start
        start = time.perf_counter()
        for (name, _, _), module in zip(layers, modules, strict=True):
            patcher.patch(loaded, module, weights[name], strength)
        synchronize(weights)
        patch = time.perf_counter() - start
    if record:
        row.load.append(load)
        row.patch.append(patch)


def only(row: Row, layers) -> Row:
    """``row`` restricted to the tensors of ``layers`` (a file holding just those modules)."""
    prefixes = tuple(module_name(name) + "." for name, _, _ in layers)
    tensors = {k: v for k, v in row.tensors.items() if k.startswith(prefixes)}
    return Row(row.label, tensors, row.params, row.macs, row.modewise, row.per_layer)


def one_per_shape(layers):
    seen, out = set(), []
    for name, o, i in layers:
        if (o, i) not in seen:
            seen.add((o, i))
            out.append((name, o, i))
    return out


def check_patch(patcher, core, rows: list[Row], layers, strength: float) -> None:
    """One layer per adapter: the patched weight equals fp16(W + strength·(W' − W))."""
    name, out, inp = layers[0]
    module = module_name(name)
    for row in rows:
        weight = fp16_weights([(name, out, inp)], seed=1, device=next(iter(row.tensors.values())).device)[name]
        group = core.format.group_by_module(row.tensors)[module]
        w32 = weight.float()
        with torch.no_grad():
            adapter = core.format.build_adapter((out, inp), group).to(weight.device)
            want = (w32 + strength * adapter.delta_weight(w32)).half()
        run_pass(patcher, only(row, [(name, out, inp)]), [(name, out, inp)], {name: weight}, strength, record=False)
        err = (weight.float() - want.float()).abs().max().item()
        if err > 2e-3 or torch.equal(weight, w32.half()):
            raise AssertionError(f"{row.label}: patched weight is wrong (max error {err:.2e})")


def round_trip_time(patcher, layers, weights, repeats: int) -> float:
    """Median time of every weight's patch minus the adapter's work (what any adapter pays)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for name, _, _ in layers:
            patcher.round_trip(module_name(name), weights[name])
        synchronize(weights)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def gemm_rate(device: str, size: int = 2048, repeats: int = 5) -> float:
    """Multiply-accumulates per second of a large fp32 matmul here: the arithmetic peak
    that any merge's contractions could reach at best (median of ``repeats``)."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ b
        synchronize({"a": a})
        times.append(time.perf_counter() - start)
    return size**3 / statistics.median(times[1:])


def bench_model(model: str, patcher, core, args) -> int:
    layers = MODELS[model]
    rows = [
        Row(label, *adapter_file(core, layers, m, o, seed=100 * k, device=args.device))
        for k, (label, m, o) in enumerate(PAIRS[model])
    ]
    label, method, overrides = PAIRS[model][0]
    config = core.preset(method, **overrides)
    dense = sum(core.cost.dense_merge_is_cheaper(core.TLoRA((o, i), config).cost_shape) for _, o, i in layers)
    rows.append(Row(f"{label} per layer", rows[0].tensors, rows[0].params, rows[0].macs, per_layer=True))
    if dense:  # a diagnostic row: the same adapter merged mode by mode everywhere
        rows.append(Row(f"{label} mode-wise", rows[0].tensors, rows[0].params, rows[0].macs, modewise=True))
    check_patch(patcher, core, rows, layers, args.strength)
    weights = fp16_weights(layers, seed=0, device=args.device)
    numel = sum(w.numel() for w in weights.values())
    repeats = args.repeats if model == "SD1.5" else args.sdxl_repeats
    warm = layers if model == "SD1.5" else one_per_shape(layers)
    for row in rows:
        run_pass(patcher, only(row, warm), warm, weights, args.strength, record=False)
    for _ in range(repeats):
        for row in rows:
            run_pass(patcher, row, layers, weights, args.strength)
    print(
        f"\n{model}: {len(layers)} attention linears, {numel / 1e6:.0f}M weights "
        f"({numel * 2 / 2**20:.0f} MiB fp16); {'median of ' if repeats > 1 else ''}{repeats} pass(es)"
    )
    loras = [r for r in rows[1:] if not (r.modewise or r.per_layer)]
    head = f"  {'adapter':<22}{'params':>9}{'load':>12}{'patch':>10}{'total':>10}"
    print(head + "".join(f"{'vs ' + r.label:>14}" for r in loras))
    for row in rows:
        ratios = "".join(f"{row.total() / r.total():>13.2f}×" for r in loras)
        print(
            f"  {row.label:<22}{row.params / 1e6:>8.3f}M{statistics.median(row.load) * 1e3:>10.0f}ms"
            f"{statistics.median(row.patch) * 1e3:>8.0f}ms{row.total() * 1e3:>8.0f}ms{ratios}"
        )
    if dense:
        print(
            f"  ({label}: the cost model merges {dense} of {len(layers)} layers through a dense T; "
            "the mode-wise row never does; diagnostic only)"
        )
    failures = 0
    tlora = rows[0]
    for lora in loras:
        ratio = tlora.total() / lora.total()
        ok = ratio <= TARGET
        failures += not ok
        print(f"  target: {tlora.label} ≤ {TARGET:g}× {lora.label} → {ratio:.2f}× {'OK' if ok else 'MISSED'}")
    rate = gemm_rate(args.device)
    trip = round_trip_time(patcher, layers, weights, repeats)
    floor = trip + tlora.macs / rate
    print(
        f"  floor: {tlora.label}'s merge is {tlora.macs / 1e9:.1f} GMAC of arithmetic ("
        + ", ".join(f"{r.label}: {r.macs / 1e9:.2f}" for r in loras)
        + f"): {tlora.macs / rate * 1e3:.0f} ms at this machine's fp32 matmul peak, measured now"
        f" ({rate / 1e9:.0f} GMAC/s, 2048² matmuls), plus {trip * 1e3:.0f} ms for the patcher's fp32 copy and cast"
        f" back of every weight, timed alone = {floor * 1e3:.0f} ms: "
        + ", ".join(f"{floor / r.total():.2f}× {r.label}" for r in loras)
        + " with no other memory traffic and every contraction at peak"
    )
    del weights
    return failures


# -- peak memory of one wide merge (in a fresh subprocess per adapter) ----------------------
def rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field_name} in /proc/self/status")


def memory_probe(args) -> None:
    """Peak memory of patching one PROBE_SHAPE weight beyond the stored fp16 weight and the
    loaded adapter (the fp32 working copy of the patch included). Prints JSON."""
    import resource

    comfy = import_comfyui(args.comfyui) if args.comfyui else None
    core = core_namespace(args.comfyui)
    patcher = ComfyPatcher(comfy, core) if comfy else CorePatcher(core)
    label, method, overrides = PROBE_ROWS[args.memory_probe]
    out, inp = PROBE_SHAPE
    layers = [("ff.net.2", out, inp)]
    row = Row(label, *adapter_file(core, layers, method, overrides, seed=7))
    weight = fp16_weights(layers, seed=0)["ff.net.2"]
    with torch.no_grad():
        loaded = patcher.load(row.tensors, [module_name("ff.net.2")])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before, how = rss_kib("VmRSS"), "VmHWM after clear_refs"
    except OSError:
        before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss delta (lower bound)"
    with torch.no_grad():
        patcher.patch(loaded, module_name("ff.net.2"), weight, args.strength)
    after = rss_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"label": label, "extra_mib": (after - before) / 1024, "how": how}))


def bench_memory(args) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks go back to the OS when freed
    results = []
    for k in range(len(PROBE_ROWS)):
        cmd = [sys.executable, __file__, "--memory-probe", str(k), "--strength", str(args.strength)]
        if args.comfyui:
            cmd += ["--comfyui", str(args.comfyui)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"memory probe failed:\n{proc.stdout}\n{proc.stderr}")
        results.append(json.loads(lines[-1]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="measured passes for SD1.5 (median)")
    parser.add_argument("--sdxl-repeats", type=int, default=1, help="measured passes for SDXL (median)")
    parser.add_argument("--models", default="SD1.5,SDXL")
    parser.add_argument("--strength", type=float, default=STRENGTH)
    parser.add_argument("--comfyui", type=Path, default=None, help="a ComfyUI dir: patch through its own loader")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the 10240→1280 peak-memory probe")
    parser.add_argument("--device", default="cpu", help="where the weights are patched (cpu, cuda)")
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_probe is not None:
        memory_probe(args)
        return 0

    comfy = import_comfyui(args.comfyui) if args.comfyui else None
    core = core_namespace(args.comfyui)
    patcher = ComfyPatcher(comfy, core) if comfy else CorePatcher(core)
    load = os.getloadavg()[0]
    print(
        f"merge_speed: {patcher.mode}; {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"strength {args.strength:g}, load average {load:.2f} at start"
    )
    failures = 0
    for model in args.models.split(","):
        failures += bench_model(model.strip(), patcher, core, args)
    if not args.no_memory:
        out, inp = PROBE_SHAPE
        print(
            f"\npeak extra memory patching one {inp}→{out} weight, its {out * inp * 4 / 2**20:.0f} MiB fp32 working "
            f"copy included (a dense T would be {inp * inp * 4 / 2**20:.0f} MiB):"
        )
        for res in bench_memory(args):
            print(f"  {res['label']:<22}{res['extra_mib']:>8.0f} MiB   ({res['how']})")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; {'all targets met' if not failures else 'targets MISSED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
