"""Which layers to adapt: named groups of layer-name globs per model architecture.

A glob selects a layer when it matches the layer's whole name or a dotted tail of it
(``attn1.to_q`` selects ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``).

An architecture is known by the name of ComfyUI's model config class (``SD15``, ``SDXL``,
``Flux``, ``WAN21_T2V`` …; a subclass, e.g. ``FluxSchnell`` or ``WAN21_I2V``, takes its parent's
preset). Names are the module names inside the diffusion model (ComfyUI's). ``attention`` is
every family's default: its attention projections, fused ones included; docs/families.md says
why for each family. Text-encoder groups (CLIP's attention) are the same for every family.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence


def _qkvo(prefix: str, names: str) -> tuple[str, ...]:
    return tuple(prefix + n for n in names.split())


_SD_SELF = _qkvo("attn1.", "to_q to_k to_v to_out.0")
_SD_CROSS = _qkvo("attn2.", "to_q to_k to_v to_out.0")
_QWEN_IMAGE = _qkvo("transformer_blocks.*.attn.", "to_q to_k to_v to_out.0")
_QWEN_TEXT = _qkvo("transformer_blocks.*.attn.", "add_q_proj add_k_proj add_v_proj to_add_out")
_WAN_SELF = _qkvo("blocks.*.self_attn.", "q k v o")
_WAN_CROSS = _qkvo("blocks.*.cross_attn.", "q k v o")

PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # Stable Diffusion UNets (1.x, 2.x, XL): the paper's layer set (q, k, v, out of every attention).
    "sd_unet": {
        "attention": _SD_SELF + _SD_CROSS,
        "self_attention": _SD_SELF,
        "cross_attention": _SD_CROSS,
        "feed_forward": ("ff.net.0.proj", "ff.net.2"),
        "proj": ("proj_in", "proj_out"),
        "conv": ("in_layers.2", "out_layers.3", "skip_connection", "conv1", "conv2", "conv_shortcut"),
        "resblock_time": ("emb_layers.1",),
    },
    # SD3 / SD3.5 (MMDiT): fused qkv and the output projection of both streams (+ Medium's attn2).
    "mmdit": {
        "attention": ("joint_blocks.*.attn.qkv", "joint_blocks.*.attn.proj", "joint_blocks.*.attn2.*"),
        "image_stream": ("joint_blocks.*.x_block.attn.*", "joint_blocks.*.x_block.attn2.*"),
        "text_stream": ("joint_blocks.*.context_block.attn.*",),
        "mlp": ("joint_blocks.*.mlp.fc1", "joint_blocks.*.mlp.fc2"),
        "modulation": ("joint_blocks.*.adaLN_modulation.1",),
    },
    # Flux.1: double blocks' fused qkv and proj (both streams); single blocks fuse qkv with the MLP
    # (linear1) and attention output with it (linear2), so attention there means the whole block.
    "flux": {
        "attention": (
            "double_blocks.*_attn.qkv",
            "double_blocks.*_attn.proj",
            "single_blocks.*.linear1",
            "single_blocks.*.linear2",
        ),
        "double_attention": ("double_blocks.*_attn.qkv", "double_blocks.*_attn.proj"),
        "image_stream": ("double_blocks.*.img_attn.*",),
        "text_stream": ("double_blocks.*.txt_attn.*",),
        "single_blocks": ("single_blocks.*.linear1", "single_blocks.*.linear2"),
        "mlp": ("double_blocks.*_mlp.0", "double_blocks.*_mlp.2"),
        "modulation": ("double_blocks.*_mod.lin", "single_blocks.*.modulation.lin"),
    },
    # Qwen-Image: q, k, v, out of both streams.
    "qwen_image": {
        "attention": _QWEN_IMAGE + _QWEN_TEXT,
        "image_stream": _QWEN_IMAGE,
        "text_stream": _QWEN_TEXT,
        "mlp": ("transformer_blocks.*_mlp.net.0.proj", "transformer_blocks.*_mlp.net.2"),
        "modulation": ("transformer_blocks.*_mod.1",),
    },
    # Z-Image / Lumina 2 (NextDiT): fused qkv and out, in the layers and both refiners.
    "lumina": {
        "attention": ("attention.qkv", "attention.out"),
        "mlp": ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
        "modulation": ("adaLN_modulation.0",),
        "refiners": ("noise_refiner.*", "context_refiner.*"),
    },
    # Wan 2.1 / 2.2: q, k, v, o of self- and cross-attention.
    "wan": {
        "attention": _WAN_SELF + _WAN_CROSS,
        "self_attention": _WAN_SELF,
        "cross_attention": _WAN_CROSS,
        "mlp": ("blocks.*.ffn.0", "blocks.*.ffn.2"),
    },
}

# ComfyUI's model config class name → preset (subclasses resolve through their parents' names).
ARCHITECTURES: dict[str, str] = {
    **dict.fromkeys(("SD15", "SD20", "SDXL", "SDXLRefiner", "Stable_Zero123"), "sd_unet"),
    "SD3": "mmdit",
    "Flux": "flux",
    "QwenImage": "qwen_image",
    "Lumina2": "lumina",
    "WAN21_T2V": "wan",
}

# The text encoder's groups (CLIP's attention), for every family that has a CLIP.
TEXT_ENCODER_GROUPS: dict[str, tuple[str, ...]] = {
    "text_attention": _qkvo("self_attn.", "q_proj k_proj v_proj out_proj"),
}
DEFAULT_TARGETS = ("attention",)


def matches(name: str, globs: Iterable[str]) -> bool:
    """Whether a glob matches ``name`` whole or a dotted tail of it."""
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name, "*." + g) for g in globs)


def preset_of(architecture: Sequence[str] | None) -> str | None:
    """The preset of an architecture given as its config class name and its parents' (most
    specific first), or None. No architecture: Stable Diffusion UNet names (the core's default)."""
    if architecture is None:
        return "sd_unet"
    return next((ARCHITECTURES[name] for name in architecture if name in ARCHITECTURES), None)


def is_pattern(target: str) -> bool:
    """A target that is a layer-name glob (``*.attn1.to_q``) rather than a group name."""
    return any(c in target for c in "*?[.")


def resolve(targets: Iterable[str], architecture: Sequence[str] | None = None) -> tuple[str, ...]:
    """The layer-name globs of ``targets`` (group names, text-encoder groups and globs) for
    ``architecture`` (see :func:`preset_of`); a clear ValueError, naming the architecture and
    what it offers, for a group it does not have."""
    groups = {**PRESETS.get(preset_of(architecture), {}), **TEXT_ENCODER_GROUPS}
    patterns: list[str] = []
    for target in targets:
        if is_pattern(target):
            patterns.append(target)
        elif target in groups:
            patterns.extend(groups[target])
        else:
            groups = {g: p for g, p in groups.items() if g not in TEXT_ENCODER_GROUPS}
            name = architecture[0] if architecture else "this model"
            offered = f"its groups are {sorted(groups)}" if groups else "it has no layer-group preset"
            raise ValueError(
                f"no layer group {target!r} for {name}: {offered}. Name layers by glob instead, e.g. "
                "'*.attn.qkv,*.attn.proj' (module names inside the diffusion model)"
            )
    return tuple(patterns)
