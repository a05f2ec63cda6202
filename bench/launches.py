"""ATen ops dispatched per training step (forward, backward, clipping, optimizer) for every
method, side by side with LoRA r=4.

    python bench/launches.py [--sets tiny sdxl flux] [--time STEPS --threads 1 [--compile]]

On a GPU every dispatched op costs a kernel launch (or at least its CPU-side dispatch), and a
step of small adapter ops is bound by those, not by arithmetic (bench/RESULTS.md, "On a GPU").
The count is deterministic and needs no GPU: a ``TorchDispatchMode`` counts every op that
reaches the dispatcher during one ``Trainer.train_step``, after a warm-up step (so the
optimizer state exists). Each method runs on its own path (``plain``) and with the factors of
same-shaped layers built per group (``batched``: :func:`tlora.batched.prepared`, the default on
CUDA). With ``--time``, ``--compile`` also times the batched path with its factor build through
``torch.compile`` (``compiled``; its ops are not counted: a compiled kernel is no ATen op).

Layer sets:

- ``tiny``: 16 adapted 320-wide Linears in a chain, 256 tokens, on the CPU (issue #16's table);
- ``sdxl``: SDXL's 560 attention Linears (:data:`bench.shapes.SDXL`) in their transformer
  blocks (self- then cross-attention around ``scaled_dot_product_attention``), 1024 px
  (4096 / 1024 tokens, 77 context tokens), on the meta device;
- ``flux``: Flux's attention Linears, 3072 wide: 19 double blocks (fused qkv 9216×3072 and
  proj, image and text streams) and 38 single blocks (linear1 21504×3072, linear2 3072×15360),
  4096 image + 512 text tokens, on the meta device.

On the meta device no value exists: ``.item()`` and ``bool()`` of a meta tensor read as 0 and
True, so the finite-loss check passes and StiefelAdam's Newton–Schulz loop stops after its
first convergence test (on real data it runs ≈ 2-4 more iterations per shape, ≈ 10 ops each).
Gradient clipping and Adam take their foreach and fused paths there as on CPU and CUDA (torch
keeps them to real devices: on meta it would fall back to a few ops per tensor).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlora import stiefel
from tlora.adapters import SODA, TLoRA, preset, soda_preset
from tlora.adapters.base import Adapter
from tlora.batched import prepared
from tlora.model import attached
from tlora.options import TrainingOptions
from tlora.train import Trainer

METHODS: dict[str, Callable[[tuple[int, int]], Adapter]] = {
    "LoRA r=4": lambda shape: TLoRA(shape, preset("lora", residual_rank=4)),
    "LoRA r=8": lambda shape: TLoRA(shape, preset("lora", residual_rank=8)),
    "TLoRA(2,6)": lambda shape: TLoRA(shape, preset("tlora", transform_rank=2, residual_rank=6)),
    "TLoRA*(2,4)": lambda shape: TLoRA(shape, preset("tlora_star", transform_rank=2, residual_rank=4)),
    "transform(2)": lambda shape: TLoRA(shape, preset("transform", transform_rank=2)),
    "residual TR(6)": lambda shape: TLoRA(shape, preset("residual", residual_rank=6)),
    "SODA": lambda shape: SODA(shape, soda_preset("soda")),
    "SVDiff": lambda shape: SODA(shape, soda_preset("svdiff")),
}
REFERENCE = "LoRA r=4"
# Issue #16's targets: ops per step of the batched path ≤ limit × LoRA r=4's (its cheaper path),
# on these sets (Flux's is reported alone: its 15360-wide linear2 keeps its own path).
TARGETS = {"TLoRA(2,6)": 1.5, "SODA": 1.5}
TARGET_SETS = ("tiny", "sdxl")
MODES = ("plain", "batched")


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched inside the block, by name. On the meta device, ``.item()``
    reads 0 (True for a bool) so that value-dependent code runs on."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


# -- layer sets --------------------------------------------------------------------------------
@dataclass
class LayerSet:
    """A frozen model, the Linears to adapt (by name) and its loss on fixed inputs."""

    model: nn.Module
    loss: Callable[[], Tensor]
    device: torch.device

    def modules(self) -> dict[str, nn.Linear]:
        return {name: m for name, m in self.model.named_modules() if getattr(m, "adapted", False)}


def frozen_linear(in_features: int, out_features: int, device: str, bias: bool = True, adapted: bool = True):
    layer = nn.Linear(in_features, out_features, bias=bias, device=device).requires_grad_(False)
    if device != "meta":
        nn.init.normal_(layer.weight, std=in_features**-0.5)
    layer.adapted = adapted
    return layer


def tiny(device: str = "cpu", layers: int = 16) -> LayerSet:
    """16 adapted 320→320 Linears in a chain, 256 tokens; loss: MSE to a random target."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[frozen_linear(320, 320, device) for _ in range(layers)])
    x, target = (torch.randn(256, 320, generator=gen).to(device) for _ in range(2))
    return LayerSet(model, lambda: (model(x) - target).pow(2).mean(), torch.device(device))


class Attention(nn.Module):
    """Single-head attention with SD's layer names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, width: int, context: int, device: str):
        super().__init__()
        self.to_q = frozen_linear(width, width, device, bias=False)
        self.to_k = frozen_linear(context, width, device, bias=False)
        self.to_v = frozen_linear(context, width, device, bias=False)
        self.to_out = nn.ModuleList([frozen_linear(width, width, device)])

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](F.scaled_dot_product_attention(q, k, v))


class SDXLAttention(nn.Module):
    """SDXL's 70 transformer blocks' attention (10 at 640 wide, 60 at 1280), a frozen 2×2 pool
    and projection between the widths; 560 adapted Linears (the shapes of bench/shapes.SDXL)."""

    def __init__(self, device: str, blocks: tuple[int, int] = (10, 60)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.ModuleList(
                nn.ModuleDict({"attn1": Attention(w, w, device), "attn2": Attention(w, 2048, device)})
                for _ in range(count)
            )
            for w, count in zip((640, 1280), blocks, strict=True)
        )
        self.widen = frozen_linear(640, 1280, device, adapted=False)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        for s, stage in enumerate(self.stages):
            if s:
                h = self.widen(h.unflatten(1, (-1, 4)).mean(2))
            for block in stage:
                h = h + block["attn1"](h, h)
                h = h + block["attn2"](h, context)
        return h


def sdxl(device: str = "meta", blocks: tuple[int, int] = (10, 60)) -> LayerSet:
    model = SDXLAttention(device, blocks)
    h, context = torch.randn(1, 4096, 640, device=device), torch.randn(1, 77, 2048, device=device)
    return LayerSet(model, lambda: model(h, context).pow(2).mean(), torch.device(device))


class FluxAttention(nn.Module):
    """Flux's attention Linears: double blocks (image and text streams, fused qkv and proj;
    joint attention) then single blocks (linear1 = qkv + MLP in, linear2 = attention + MLP out).
    The frozen rest (modulation, norms, the double blocks' MLPs) is left out."""

    width, mlp_width = 3072, 4 * 3072

    def __init__(self, device: str, double: int = 19, single: int = 38):
        super().__init__()
        w, mlp = self.width, self.mlp_width

        def stream():
            return nn.ModuleDict({"qkv": frozen_linear(w, 3 * w, device), "proj": frozen_linear(w, w, device)})

        self.double_blocks = nn.ModuleList(
            nn.ModuleDict({"img_attn": stream(), "txt_attn": stream()}) for _ in range(double)
        )
        self.single_blocks = nn.ModuleList(
            nn.ModuleDict(
                {"linear1": frozen_linear(w, 3 * w + mlp, device), "linear2": frozen_linear(w + mlp, w, device)}
            )
            for _ in range(single)
        )

    def forward(self, img: Tensor, txt: Tensor) -> Tensor:
        w, text = self.width, txt.shape[1]
        for block in self.double_blocks:
            qkv = torch.cat([block["txt_attn"]["qkv"](txt), block["img_attn"]["qkv"](img)], dim=1)
            attn = F.scaled_dot_product_attention(*qkv.split(w, dim=-1))
            txt = txt + block["txt_attn"]["proj"](attn[:, :text])
            img = img + block["img_attn"]["proj"](attn[:, text:])
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            qkv, mlp = block["linear1"](x).split([3 * w, self.mlp_width], dim=-1)
            attn = F.scaled_dot_product_attention(*qkv.split(w, dim=-1))
            x = x + block["linear2"](torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        return x


def flux(device: str = "meta") -> LayerSet:
    model = FluxAttention(device)
    img, txt = torch.randn(1, 4096, 3072, device=device), torch.randn(1, 512, 3072, device=device)
    return LayerSet(model, lambda: model(img, txt).pow(2).mean(), torch.device(device))


SETS: dict[str, Callable[[], LayerSet]] = {"tiny": tiny, "sdxl": sdxl, "flux": flux}


# -- counting ----------------------------------------------------------------------------------
def bind_on_meta(adapter: SODA) -> None:
    """A SODA adapter takes the SVD of its weight's values; on the meta device there are none:
    give it U, σ, Vh of the right shapes (the count does not depend on their values)."""
    m, n, r = adapter.out_features, adapter.in_features, adapter.rank
    adapter.U, adapter.sigma, adapter.Vh = (torch.empty(s, device="meta") for s in ((m, r), (r,), (r, n)))
    adapter._verified = True


def adapters_for(layer_set: LayerSet, method: str) -> dict[str, Adapter]:
    adapters = {}
    for name, module in layer_set.modules().items():
        adapter = METHODS[method](tuple(module.weight.shape)).to(layer_set.device)
        if isinstance(adapter, SODA):
            if layer_set.device.type == "meta":
                bind_on_meta(adapter)
            else:
                adapter.bind(module.weight)
        adapters[name] = adapter
    return adapters


@contextlib.contextmanager
def meta_kernels_as_on_cpu() -> Iterator[None]:
    """``clip_grad_norm_`` by foreach ops and Adam by its fused kernel on meta tensors, as on
    CPU and CUDA (torch has both for meta, but only picks them on real devices)."""
    clip_grad, adam_module = torch.nn.utils.clip_grad, importlib.import_module("torch.optim.adam")
    has_foreach, check_fused, fused_exist = (
        clip_grad._has_foreach_support,
        adam_module._device_dtype_check_for_fused,
        stiefel.fused_kernels_exist,
    )
    clip_grad._has_foreach_support = lambda tensors, device: device.type == "meta" or has_foreach(tensors, device)
    adam_module._device_dtype_check_for_fused = lambda p, *args, **kwargs: p.is_meta or check_fused(p, *args, **kwargs)
    stiefel.fused_kernels_exist = lambda params: all(p.is_meta for p in params) or fused_exist(params)
    try:
        yield
    finally:
        clip_grad._has_foreach_support = has_foreach
        adam_module._device_dtype_check_for_fused = check_fused
        stiefel.fused_kernels_exist = fused_exist


@contextlib.contextmanager
def training(layer_set: LayerSet, method: str, mode: str) -> Iterator[Callable[[], float]]:
    """``method``'s adapters attached to ``layer_set`` and a trainer; yields its ``train_step``
    on the layer set's loss (``mode``: each layer's own path, batched factors, or batched
    factors built through ``torch.compile``)."""
    meta = meta_kernels_as_on_cpu() if layer_set.device.type == "meta" else contextlib.nullcontext()
    adapters = adapters_for(layer_set, method)

    def micro_loss(step: int, micro: int) -> Tensor:
        with prepared(adapters.values(), compile=mode == "compiled") if mode != "plain" else contextlib.nullcontext():
            return layer_set.loss()

    with attached(layer_set.modules(), adapters), meta:
        trainer = Trainer(adapters, TrainingOptions(steps=1000))
        yield lambda: trainer.train_step(micro_loss)


def count_step(layer_set: LayerSet, method: str, mode: str) -> OpCounter:
    """Ops of one ``Trainer.train_step`` (after a warm-up step) of ``method`` on ``layer_set``."""
    counter = OpCounter()
    with training(layer_set, method, mode) as train_step:
        with OpCounter():  # the warm-up step (a counter too: it answers .item() on meta)
            train_step()
        with counter:
            train_step()
    return counter


def step_time(layer_set: LayerSet, method: str, mode: str, steps: int) -> float:
    """Median CPU time (s) of this process over ``steps`` training steps, after two warm-up
    steps (the first compiles, in mode ``compiled``): unlike wall time, not inflated by other
    jobs on a shared machine (run one thread, ``--threads 1``, so that no thread spins waiting
    for another)."""
    with training(layer_set, method, mode) as train_step:
        train_step()
        train_step()
        times = []
        for _ in range(steps):
            start = time.process_time()
            train_step()
            times.append(time.process_time() - start)
    return statistics.median(times)


def count_all(set_name: str, methods=tuple(METHODS), modes=MODES) -> dict[tuple[str, str], int]:
    """``(method, mode) → ops per step`` on one of :data:`SETS`."""
    return count_all_on(SETS[set_name](), methods, modes)


def count_all_on(layer_set: LayerSet, methods=tuple(METHODS), modes=MODES) -> dict[tuple[str, str], int]:
    return {(method, mode): count_step(layer_set, method, mode).total for method in methods for mode in modes}


def reference_count(counts: dict[tuple[str, str], int]) -> int:
    """LoRA r=4 on its cheaper path: the denominator of every ratio."""
    return min(counts[(REFERENCE, mode)] for mode in MODES)


def report(
    set_name: str, counts: dict[tuple[str, str], int], layers: int, times: dict[tuple[str, str], float] | None = None
) -> list[str]:
    lora = reference_count(counts)
    lines = [f"{set_name}: {layers} adapted layers; ops per step (per layer), × {REFERENCE} ({lora} ops)"]
    if times:
        lines[0] += "; CPU time per step (median)"
    width = 34 if times else 24
    compiled = bool(times) and any(mode == "compiled" for _, mode in times)
    lines.append(
        f"  {'method':<16}" + "".join(f"{mode:>{width}}" for mode in MODES) + (f"{'compiled':>11}" if compiled else "")
    )
    methods = dict.fromkeys(method for method, _ in counts)
    for method in methods:
        cells = []
        for mode in MODES:
            n = counts[(method, mode)]
            cell = f"{n:>9,} ({n / layers:5.1f}) {n / lora:5.2f}×"
            if times:
                cell += f" {times[(method, mode)] * 1e3:7.1f}ms"
            cells.append(cell)
        compiled_cell = f"{times[(method, 'compiled')] * 1e3:9.1f}ms" if compiled else ""
        lines.append(f"  {method:<16}" + "".join(f"{c:>{width}}" for c in cells) + compiled_cell)
    for method, limit in TARGETS.items():
        if (method, "batched") in counts and set_name in TARGET_SETS:
            ratio = counts[(method, "batched")] / lora
            verdict = "OK" if ratio <= limit else "MISSED"
            lines.append(f"  target: {method} batched ≤ {limit}× {REFERENCE}: {ratio:.2f}× {verdict}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--time", type=int, default=0, metavar="STEPS", help="also time STEPS steps (tiny set, CPU)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="with --time: also time the batched build compiled")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys([REFERENCE, *args.methods]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ops dispatched per Trainer.train_step")
    missed = False
    for set_name in args.sets:
        counts = count_all(set_name, methods)
        layer_set = SETS[set_name]()
        times = None
        if args.time and layer_set.device.type != "meta":
            modes = [*MODES, "compiled"] if args.compile else MODES
            times = {(m, mode): step_time(layer_set, m, mode, args.time) for m in methods for mode in modes}
        lines = report(set_name, counts, len(layer_set.modules()), times)
        missed |= any(line.endswith("MISSED") for line in lines)
        print("\n".join(lines) + "\n", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
