"""Model surgery: pick the layers of a torch model to adapt, run them through adapters, and
the other temporary patches training needs (gradient checkpointing, norms on copies, layers
recomputed in backward). Every patch swaps module forwards inside one context manager,
:func:`swapped_forwards`, which restores them on exit.

Two ways to run an adapted layer: merged (the adapter reads the layer's stored weight, fp32,
bf16 or fp16), or bypassed (:meth:`Adapter.bypass` around the layer's own forward: fp8 or
quantized weights, weights streamed from system memory; the host casts them).

Layer names follow the model's own ``named_modules()``; which names each target means, per
architecture, is :mod:`tlora.targets`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .adapters import METHODS, Adapter
from .adapters.base import ConvArgs, base_forward
from .targets import DEFAULT_TARGETS, matches, resolve


def select_modules(
    model: nn.Module,
    targets: Iterable[str] = DEFAULT_TARGETS,
    patterns: Iterable[str] = (),
    architecture: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers of ``model`` named by ``targets`` (groups of ``architecture``'s
    preset, text-encoder groups or globs; see :mod:`tlora.targets`) or by the globs ``patterns``.
    Grouped or non-zero-padded convs are skipped (their weight is not one matrix)."""
    globs = resolve(targets, architecture) + tuple(patterns)
    selected = {}
    for name, module in model.named_modules():
        if not matches(name, globs):
            continue
        if is_linear(module) or (
            isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
        ):
            selected[name] = module
    return selected


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a layer that stands for one without subclassing it (some hosts'
    quantized layers): ``in_features``, ``out_features`` and a weight ``[out, in]``."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    return isinstance(weight, Tensor) and tuple(weight.shape) == shape


PLAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_plain_weight(weight: Tensor) -> bool:
    """Whether a layer weight is an ordinary fp32/bf16/fp16 tensor an adapter can read as it
    is (not fp8, not a quantized tensor subclass)."""
    return type(weight) in (Tensor, nn.Parameter) and weight.dtype in PLAIN_DTYPES


def stored_weight(module: nn.Module, device: torch.device) -> Tensor:
    """``module.weight`` as stored, in fp32 on ``device`` (plain weights; hosts with their own
    storage pass their cast instead)."""
    return module.weight.to(device, torch.float32)


def adapted_forward(module: nn.Module, adapter: Adapter) -> Callable[[Tensor], Tensor]:
    """A replacement ``forward`` for ``module`` that runs the layer through ``adapter``."""
    conv = ConvArgs.of(module) if isinstance(module, nn.Conv2d) else None

    def forward(x: Tensor) -> Tensor:
        weight = module.weight.to(x.device)
        bias = None if module.bias is None else module.bias.to(x.device)
        if adapter.bypassed:
            return base_forward(x, weight, bias, conv)
        return adapter(x, weight, bias, conv)

    return forward


def bypass_forward(
    module: nn.Module, adapter: Adapter, weight_of: Callable[[nn.Module, torch.device], Tensor]
) -> Callable[..., Tensor]:
    """A replacement ``forward`` that runs ``adapter``'s bypass form around the layer's forward
    as it is now (the host's op: it casts fp8, quantized or offloaded weights itself). The weight
    is read, through ``weight_of(module, device)`` in fp32, only where the method needs it
    (SODA's SVD if not taken yet; conv layers)."""
    base = module.forward
    conv = ConvArgs.of(module) if isinstance(module, nn.Conv2d) else None

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if adapter.bypassed:
            return base(x, *args, **kwargs)
        return adapter.bypass(x, lambda u: base(u, *args, **kwargs), lambda: weight_of(module, x.device), conv)

    return forward


class swapped_forwards:  # a context manager, named like torch.no_grad
    """Each module runs the given ``forward`` inside the block; what it ran before is back on
    exit (an instance attribute shadows the class's method: an outer swap's, or none). Entered
    without an exit, the swap stays for good (a model that keeps its adapters)."""

    def __init__(self, forwards: Mapping[nn.Module, Callable]):
        self.forwards = dict(forwards)
        self.before: dict[nn.Module, Callable | None] = {}

    def __enter__(self) -> swapped_forwards:
        for module, forward in self.forwards.items():
            self.before[module] = module.__dict__.get("forward")
            module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for module, before in self.before.items():
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before
        self.before = {}


def attached(
    modules: Mapping[str, nn.Module],
    adapters: Mapping[str, Adapter],
    *,
    bypass: bool = False,
    weight_of: Callable[[nn.Module, torch.device], Tensor] = stored_weight,
) -> swapped_forwards:
    """Route each named module's forward through its adapter inside the block. The base
    weights stay untouched (and frozen: only adapters get gradients). ``bypass``: each layer
    runs as :func:`bypass_forward` around its forward as it is when this is called, reading its
    weight through ``weight_of`` where needed; else the adapter merges the stored weight."""
    missing = sorted(set(adapters) - set(modules))
    if missing:
        raise KeyError(f"no module for adapter(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if bypass:
        forwards = {modules[name]: bypass_forward(modules[name], a, weight_of) for name, a in adapters.items()}
    else:
        forwards = {modules[name]: adapted_forward(modules[name], a) for name, a in adapters.items()}
    return swapped_forwards(forwards)


@contextlib.contextmanager
def bypassed(adapters: Iterable[Adapter]) -> Iterator[None]:
    """Run attached layers as the frozen base inside the block (e.g. DCO's reference pass)."""
    adapters = list(adapters)
    for a in adapters:
        a.bypassed = True
    try:
        yield
    finally:
        for a in adapters:
            a.bypassed = False


def checkpointed_blocks(model: nn.Module) -> swapped_forwards:
    """Gradient checkpointing inside the block: each child of ``model`` (each member of a
    child ModuleList) recomputes its activations in backward instead of storing them."""
    blocks = [b for child in model.children() for b in (child if isinstance(child, nn.ModuleList) else [child])]
    return swapped_forwards(
        {
            b: lambda *a, _f=b.forward, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)
            for b in blocks
        }
    )


class _RecomputedInBackward(torch.autograd.Function):
    """``y = f(x)`` that saves only ``x``: backward runs ``f`` again (under the forward's
    autocast) and back-propagates through that second run at once, so what ``f`` touches (a
    weight cast for this call) is never kept. Parameters inside ``f`` get their gradients too."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.f = f
        kind = x.device.type
        ctx.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        with torch.no_grad():
            return f(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        f, ctx.f = ctx.f, None
        kind, dtype, enabled = ctx.autocast
        leaf = x.detach().requires_grad_()
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            y = f(leaf)
        torch.autograd.backward(y, grad)
        return leaf.grad, None


def recomputed_in_backward(
    modules: Iterable[nn.Module], when: Callable[[nn.Module], bool] | None = None
) -> swapped_forwards:
    """Inside the block each module (one tensor in, one out: Linear, Conv, norms) keeps nothing
    for backward but its input and runs again there; with ``when``, only the calls where
    ``when(module)`` holds (checked at each call). For layers whose forward casts a weight (fp8
    to bf16, or streamed from system memory): autograd would keep every cast copy until
    backward, as much memory as an unquantized model on the device, or a copy in a buffer the
    host reuses for the next layer. Costs one more forward of each such layer per step. Only
    the input's gradient is computed (the layers are frozen)."""

    def recomputed(module: nn.Module) -> Callable:
        forward = module.forward

        def run(x: Tensor, *args, **kwargs) -> Tensor:
            if not (torch.is_grad_enabled() and x.requires_grad) or (when is not None and not when(module)):
                return forward(x, *args, **kwargs)
            return _RecomputedInBackward.apply(x, lambda u: forward(u, *args, **kwargs))

        return run

    return swapped_forwards({m: recomputed(m) for m in modules})


def norms_on_copies(model: nn.Module) -> swapped_forwards:
    """Feed every LayerNorm of ``model`` a copy of its input inside the block. ComfyUI's text
    encoders and some diffusion models (Flux) add their residuals in place (``x += attn(norm(x))``),
    which overwrites the input the norm saved for backward; on a copy they train, at one copy per norm."""
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return swapped_forwards({n: lambda x, _f=n.forward: _f(x.clone()) for n in norms})


def release_inference_tensors(model: nn.Module) -> None:
    """Replace parameters and buffers created under ``torch.inference_mode`` (hosts load
    models inside it) by normal copies: autograd cannot save inference tensors for backward,
    and the frozen weights are needed there (∂L/∂x = ∂L/∂y · W)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = nn.Parameter(param.clone(), requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_inference():
                module._buffers[name] = buffer.clone()


def make_adapters(
    modules: Mapping[str, nn.Module],
    method: str,
    *,
    seed: int = 0,
    weight_of: Callable[[nn.Module], Tensor] | None = None,
    **options,
) -> dict[str, Adapter]:
    """A fresh adapter of ``method`` (see :data:`tlora.adapters.METHODS`) for each module, built
    by the method's class (:meth:`Adapter.create_train`) from the module's weight and on its
    device; ``weight_of(module)`` gives that weight instead (a host's cast of fp8, quantized or
    offloaded weights, on the training device; read one layer at a time). Layer ``i`` is seeded
    with ``seed + i``. ``options``: ranks and regularizer; those a method does not use are ignored."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    cls = METHODS[method]
    read = weight_of or (lambda module: module.weight)
    return {
        name: cls.create_train(method, read(module), seed=seed + i, **options)
        for i, (name, module) in enumerate(modules.items())
    }
