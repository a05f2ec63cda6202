"""Model surgery: pick the layers of a torch model to adapt, and run them through adapters.

Layer names follow the model's own ``named_modules()``; the groups below match both
ComfyUI's (LDM) and diffusers' names for Stable Diffusion UNets and CLIP text encoders.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import Tensor, nn

from .adapters.base import Adapter, ConvArgs

# Name suffixes of each target group.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feed_forward": ("ff.net.0.proj", "ff.net.2"),
    "proj": ("proj_in", "proj_out"),
    "conv": ("in_layers.2", "out_layers.3", "skip_connection", "conv1", "conv2", "conv_shortcut"),
    "text_attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
}
DEFAULT_TARGETS = ("attention",)


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
        return adapter(x, weight, bias, conv)

    return forward


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
