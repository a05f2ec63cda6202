"""Model surgery: pick the layers of a torch model to adapt, and run them through adapters.

Layer names follow the model's own ``named_modules()``; the groups below match both
ComfyUI's (LDM) and diffusers' names for Stable Diffusion UNets and CLIP text encoders.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator

from torch import Tensor, nn

from .adapters.base import Adapter, ConvArgs, base_forward
from .adapters.soda import SODA, SODA_PRESETS, soda_preset
from .adapters.tlora import PRESETS, TLoRA, preset

# Name suffixes of each target group.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feed_forward": ("ff.net.0.proj", "ff.net.2"),
    "proj": ("proj_in", "proj_out"),
    "conv": ("in_layers.2", "out_layers.3", "skip_connection", "conv1", "conv2", "conv_shortcut"),
    "text_attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
}
TEXT_ENCODER_GROUPS = ("text_attention",)  # groups that live in the text encoder, not the UNet
DEFAULT_TARGETS = ("attention",)
METHODS = (*PRESETS, *SODA_PRESETS)


def _matches(name: str, suffixes: Iterable[str], patterns: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes) or any(
        fnmatch.fnmatchcase(name, p) for p in patterns
    )


def select_modules(
    model: nn.Module, groups: Iterable[str] = DEFAULT_TARGETS, patterns: Iterable[str] = ()
) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers of ``model`` whose name ends with a suffix of one of
    ``groups`` (see :data:`TARGET_GROUPS`) or matches one of the glob ``patterns``.
    Grouped or non-zero-padded convs are skipped (their weight is not one matrix)."""
    groups, patterns = tuple(groups), tuple(patterns)
    unknown = [g for g in groups if g not in TARGET_GROUPS]
    if unknown:
        raise ValueError(f"unknown target group(s) {unknown}; choose from {sorted(TARGET_GROUPS)}")
    suffixes = [s for g in groups for s in TARGET_GROUPS[g]]
    selected = {}
    for name, module in model.named_modules():
        if not _matches(name, suffixes, patterns):
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
        if getattr(adapter, "bypassed", False):
            return base_forward(x, weight, bias, conv)
        return adapter(x, weight, bias, conv)

    return forward


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


def attach(modules: dict[str, nn.Module], adapters: dict[str, Adapter]) -> Callable[[], None]:
    """Route each named module's forward through its adapter; returns a function that undoes
    it. The base weights stay untouched (and frozen: only adapters get gradients)."""
    missing = sorted(set(adapters) - set(modules))
    if missing:
        raise KeyError(f"no module for adapter(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
    for name, adapter in adapters.items():
        modules[name].forward = adapted_forward(modules[name], adapter)

    def detach() -> None:
        for name in adapters:
            modules[name].__dict__.pop("forward", None)

    return detach


def make_adapters(
    modules: dict[str, nn.Module],
    method: str,
    *,
    transform_rank: int = 2,
    residual_rank: int = 6,
    regularizer: str = "none",
    regularizer_weight: float = 0.0,
    seed: int = 0,
) -> dict[str, Adapter]:
    """A fresh adapter of ``method`` (see :data:`METHODS`) for each module, on the module's
    device; SODA adapters take their SVD of the module's weight here. Layer ``i`` is seeded
    with ``seed + i``. Ranks that a method does not use are ignored."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    adapters: dict[str, Adapter] = {}
    for i, (name, module) in enumerate(modules.items()):
        weight = module.weight
        if method in SODA_PRESETS:
            adapter = SODA(tuple(weight.shape), soda_preset(method)).to(weight.device)
            adapter.bind(weight)
        else:
            overrides = {"regularizer": regularizer, "regularizer_weight": regularizer_weight}
            if PRESETS[method].transform_rank:
                overrides["transform_rank"] = transform_rank
            if PRESETS[method].has_residual:
                overrides["residual_rank"] = residual_rank
            adapter = TLoRA(tuple(weight.shape), preset(method, **overrides), seed=seed + i).to(weight.device)
        adapters[name] = adapter
    return adapters
