"""Model surgery: pick the layers of a torch model to adapt, run them through adapters, and
the other temporary patches training needs (gradient checkpointing, norms on copies). Every
patch swaps module forwards inside one context manager, :func:`swapped_forwards`, which
restores them on exit.

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
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
        ):
            selected[name] = module
    return selected


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


class swapped_forwards:  # a context manager, named like torch.no_grad
    """Each module runs the given ``forward`` inside the block; its own is back on exit (an
    instance attribute shadows the class's method; removing it restores the method). Entered
    without an exit, the swap stays for good (a model that keeps its adapters)."""

    def __init__(self, forwards: Mapping[nn.Module, Callable]):
        self.forwards = dict(forwards)

    def __enter__(self) -> swapped_forwards:
        for module, forward in self.forwards.items():
            module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for module in self.forwards:
            module.__dict__.pop("forward", None)


def attached(modules: Mapping[str, nn.Module], adapters: Mapping[str, Adapter]) -> swapped_forwards:
    """Route each named module's forward through its adapter inside the block. The base
    weights stay untouched (and frozen: only adapters get gradients)."""
    missing = sorted(set(adapters) - set(modules))
    if missing:
        raise KeyError(f"no module for adapter(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
    return swapped_forwards({modules[name]: adapted_forward(modules[name], a) for name, a in adapters.items()})


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


def make_adapters(modules: Mapping[str, nn.Module], method: str, *, seed: int = 0, **options) -> dict[str, Adapter]:
    """A fresh adapter of ``method`` (see :data:`tlora.adapters.METHODS`) for each module, built
    by the method's class (:meth:`Adapter.create_train`) on the module's device; layer ``i`` is
    seeded with ``seed + i``. ``options``: ranks and regularizer; those a method does not use
    are ignored."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    cls = METHODS[method]
    return {
        name: cls.create_train(method, module.weight, seed=seed + i, **options)
        for i, (name, module) in enumerate(modules.items())
    }
