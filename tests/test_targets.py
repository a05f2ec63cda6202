"""Layer groups per architecture: resolved from ComfyUI's config class (and its parents), clear errors."""

import pytest
from torch import nn

from tlora.model import select_modules
from tlora.targets import PRESETS, matches, preset_of, resolve


def tree(names: list[str]) -> nn.Module:
    """A module with a Linear at each dotted name."""
    root = nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(2, 2))
    return root


FLUX = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.txt_attn.qkv",
    "double_blocks.0.txt_attn.proj",
    "double_blocks.0.img_mlp.0",
    "double_blocks.0.img_mod.lin",
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
    "single_blocks.0.modulation.lin",
    "img_in",
    "final_layer.linear",
]


def test_a_subclass_takes_its_parents_preset():
    assert preset_of(["FluxSchnell", "Flux", "BASE", "object"]) == "flux"
    assert preset_of(["WAN21_I2V", "WAN21_T2V", "BASE"]) == "wan"
    assert preset_of(["ZImage", "Lumina2", "BASE"]) == "lumina"
    assert preset_of(["SSD1B", "SDXL", "BASE"]) == "sd_unet"
    assert preset_of(["StableAudio", "BASE"]) is None
    assert preset_of(None) == "sd_unet"  # the core's default: Stable Diffusion names


def test_flux_attention_takes_fused_layers_and_nothing_else():
    model = tree(FLUX)
    selected = sorted(select_modules(model, ["attention"], architecture=["Flux"]))
    assert selected == sorted(n for n in FLUX if "_attn." in n or n.endswith(("linear1", "linear2")))
    assert sorted(select_modules(model, ["double_attention"], architecture=["Flux"])) == sorted(
        n for n in FLUX if "_attn." in n
    )
    assert sorted(select_modules(model, ["mlp", "modulation"], architecture=["Flux"])) == [
        "double_blocks.0.img_mlp.0",
        "double_blocks.0.img_mod.lin",
        "single_blocks.0.modulation.lin",
    ]


def test_globs_match_whole_names_or_dotted_tails():
    assert matches("input_blocks.1.1.transformer_blocks.0.attn1.to_q", ["attn1.to_q"])
    assert not matches("input_blocks.1.1.transformer_blocks.0.xattn1.to_q", ["attn1.to_q"])
    assert matches("joint_blocks.3.x_block.attn.qkv", ["joint_blocks.*.attn.qkv"])
    assert resolve(["*.attn.qkv", "mlp"], ["SD3"])[0] == "*.attn.qkv"


def test_unknown_group_names_the_architecture_and_its_groups():
    with pytest.raises(ValueError, match=r"no layer group 'conv' for Flux: its groups are \['attention'"):
        resolve(["conv"], ["Flux", "BASE"])
    with pytest.raises(ValueError, match="no layer group 'attention' for StableAudio: it has no layer-group preset"):
        resolve(["attention"], ["StableAudio", "BASE"])
    assert resolve(["text_attention"], ["Flux"])  # the text encoder's group exists for every family


def test_every_preset_has_attention_first():
    assert all(next(iter(groups)) == "attention" for groups in PRESETS.values())
