"""The model families people train today, as this ComfyUI itself detects, loads and samples them.

For each family of ``families.FAMILIES`` this host has (others skip, naming the missing model config):
ComfyUI's detection names the family from the tiny config and from every released size (meta device); the
layer groups place every Linear layer; the released sizes have the documented layer shapes; the tiny checkpoint
loads as the family's model class, prediction and latent; one step of ComfyUI's sampler gives a finite, bounded
latent of the right shape that depends on the conditioning.
"""

from __future__ import annotations

import gc
import importlib
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tlora import targets

from . import families as F
from .checks import denoised, loaded_state, nudge_, relative_error


@pytest.fixture(scope="module", params=list(F.FAMILIES))
def family(request, comfy) -> F.Family:
    fam = F.FAMILIES[request.param]
    why = F.missing_on_host(fam)
    if why:
        pytest.skip(why)
    return fam


@pytest.fixture(scope="module")
def family_file(family, comfy) -> Path:
    """The family's tiny checkpoint, written once per session where ComfyUI's loader nodes look for it
    (SD2.1 under checkpoints, the others under diffusion_models)."""
    import folder_paths

    if family.checkpoint:
        folder = comfy.dirs.checkpoints
    else:
        folder = comfy.dirs.checkpoints.parent / "diffusion_models"
        folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    path = folder / f"tiny_{family.key}.safetensors"
    if not path.exists():
        F.write_family(family, path.with_suffix(".partial")).rename(path)
    return path


@pytest.fixture(scope="module")
def loaded(family, family_file):
    """``.model``: the ModelPatcher ComfyUI loads from the file (one family in memory at a time)."""
    import comfy.model_management

    held = SimpleNamespace(model=F.load_family(family, family_file))
    yield held
    del held.model
    comfy.model_management.unload_all_models()
    gc.collect()


def sampler_step(model, family: F.Family, noise: torch.Tensor, cond_seed: int) -> torch.Tensor:
    """One euler step of ComfyUI's KSampler (cfg 1: the positive prompt only) from pure noise."""
    import comfy.sample

    cond = F.conditioning(family, seed=cond_seed)
    latent = torch.zeros_like(noise)
    return comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True, seed=0)


def linear_names(family: F.Family, config: dict) -> list[str]:
    return [n for n, m in F.meta_model(family, config).named_modules() if isinstance(m, torch.nn.Linear)]


def matches(name: str, globs: tuple[str, ...]) -> bool:
    return targets.matches(name, globs)


def test_detected_at_every_size(family):
    for config in [family.tiny, *family.full.values()]:
        assert type(F.detect(family, config)).__name__ == family.config_class


def test_groups_place_every_linear_layer(family):
    tiny = linear_names(family, family.tiny)
    groups = F.groups_of(family)
    linear_groups = [globs for name, globs in groups.items() if name != "conv"]  # conv: the UNet's Conv2d layers
    for glob in [g for globs in linear_groups for g in globs] + list(family.outside_blocks):
        assert any(matches(n, (glob,)) for n in tiny), f"{glob!r} matches no layer of the tiny model"
    assert next(iter(groups)) == "attention"
    for label, config in [("tiny", family.tiny), *family.full.items()]:
        names = linear_names(family, config)
        unplaced = [n for n in names if not F.group_of(family, n) and not matches(n, family.outside_blocks)]
        assert not unplaced, f"{label}: Linear layers in no group: {unplaced}"
        assert not [n for n in names if F.group_of(family, n) and matches(n, family.outside_blocks)]


# Layer shapes of the released models as ComfyUI builds them: (out_features, in_features, how many).
RELEASED_SHAPES = {
    ("sd21", "SD2.1 768-v"): {
        "middle_block.1.transformer_blocks.*.attn2.to_k": (1280, 1024, 1),
        "input_blocks.*.1.transformer_blocks.*.attn1.to_q": (320, 320, 2),
    },
    ("sd35", "SD3.5 Large"): {
        "joint_blocks.*.x_block.attn.qkv": (7296, 2432, 38),
        "joint_blocks.*.context_block.attn.proj": (2432, 2432, 37),
    },
    ("sd35", "SD3.5 Medium"): {"joint_blocks.*.x_block.attn2.qkv": (4608, 1536, 13)},
    ("flux1", "Flux.1 [dev]"): {
        "double_blocks.*.img_attn.qkv": (9216, 3072, 19),
        "double_blocks.*.txt_attn.proj": (3072, 3072, 19),
        "single_blocks.*.linear1": (21504, 3072, 38),
        "single_blocks.*.linear2": (3072, 15360, 38),
    },
    ("qwen_image", "Qwen-Image"): {
        "transformer_blocks.*.attn.to_q": (3072, 3072, 60),
        "transformer_blocks.*.attn.add_v_proj": (3072, 3072, 60),
        "transformer_blocks.*.img_mlp.net.0.proj": (12288, 3072, 60),
    },
    ("zimage", "Z-Image"): {
        "layers.*.attention.qkv": (11520, 3840, 30),
        "noise_refiner.*.attention.qkv": (11520, 3840, 2),
        "layers.*.feed_forward.w1": (10240, 3840, 30),
    },
    ("wan21", "Wan 2.1 14B"): {"blocks.*.self_attn.q": (5120, 5120, 40), "blocks.*.ffn.0": (13824, 5120, 40)},
    ("wan21", "Wan 2.1 1.3B"): {"blocks.*.cross_attn.k": (1536, 1536, 30)},
    ("wan22", "Wan 2.2 TI2V-5B"): {"blocks.*.self_attn.o": (3072, 3072, 30), "blocks.*.ffn.0": (14336, 3072, 30)},
}


def test_released_layer_shapes(family):
    sizes = [size for key, size in RELEASED_SHAPES if key == family.key]
    assert sorted(sizes) == sorted(family.full)
    for size in sizes:
        layers = F.linear_layers(F.meta_model(family, family.full[size]))
        for pattern, shape in RELEASED_SHAPES[family.key, size].items():
            assert layers.get(pattern) == shape, f"{size} {pattern}"


def test_loads_as_the_family(loaded, family):
    import comfy.model_sampling

    base = loaded.model.model
    assert type(base).__name__ == family.model_class
    assert type(base.model_config).__name__ == family.config_class
    assert base.model_type.name == family.model_type
    prediction = {"eps": comfy.model_sampling.EPS, "v": comfy.model_sampling.V_PREDICTION}
    assert isinstance(base.model_sampling, prediction.get(family.prediction, comfy.model_sampling.CONST))
    assert base.latent_format.latent_channels == family.latent[0]
    assert base.latent_format.latent_dimensions == len(family.latent) - 1


def test_sampler_step(loaded, family):
    noise = torch.randn(1, *family.latent, generator=torch.Generator().manual_seed(0))
    out = sampler_step(loaded.model, family, noise, cond_seed=0)
    assert out.shape == noise.shape
    assert torch.isfinite(out).all()
    assert out.std() > 0.0 and out.abs().max() < 1e3, "constant or exploding output: the initialization is off"
    other = sampler_step(loaded.model, family, noise, cond_seed=1)
    assert (out - other).abs().max() > 1e-3, "the output ignores the conditioning"


def test_init_places_every_tensor(comfy):
    module = torch.nn.Module()
    module.lin = torch.nn.Linear(64, 3)
    module.norm = torch.nn.RMSNorm(3)
    module.table = torch.nn.Parameter(torch.empty(2, 64))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="table"):
        F.init_tensors_(module, gen)
    with pytest.raises(RuntimeError, match="matches no tensor"):
        F.init_tensors_(module, gen, {"tabel": F.fill(0.0)})
    F.init_tensors_(module, gen, {"tab*": F.normal_last_dim, "lin.bias": F.fill(2.0)})
    assert module.norm.weight.eq(1).all() and module.lin.bias.eq(2).all()
    assert 0.08 < module.lin.weight.std() < 0.17 and 0.08 < module.table.std() < 0.17  # ~ 1/sqrt(64)


# -- training, applying and exporting on each family (issue 14) -------------------------------------------

METHODS = ("tlora", "tlora_star", "transform", "residual", "lora", "soda", "svdiff")
BIG = 50_000_000  # parameters above which a family trains one method on two layers (Qwen-Image, Z-Image, …)
SVD_WIDTH = 3072  # SODA on wider layers (Z-Image's 3840) runs with TLORA_SLOW_TESTS=1 only


def pack(name: str):
    return importlib.import_module(f"comfyui_tlora.{name}")


@pytest.fixture(scope="module")
def big(loaded) -> bool:
    return sum(p.numel() for p in loaded.model.model.diffusion_model.parameters()) > BIG


@pytest.mark.parametrize("method", METHODS)
def test_trains_applies_bypasses_and_exports(loaded, family, big, comfy, method):
    from comfy import sd

    if big and method != "tlora":
        pytest.skip(f"{family.title} is too large for every method on CPU: TLoRA only")
    model = loaded.model
    architecture = pack("nodes.apply").architecture_names(model)
    layers = pack("tlora.model").select_modules(model.model.diffusion_model, ["attention"], architecture=architecture)
    assert layers, f"{family.title}: the attention preset selects nothing"
    targets = ",".join(sorted(layers)[:2]) if big else "attention"
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, *family.latent, generator=gen), torch.randn(1, *family.latent, generator=gen)
    percent = 0.5
    sigma = float(model.model.model_sampling.percent_to_sigma(percent))
    c_out = float(model.model.model_sampling.calculate_denoised(torch.tensor(sigma), torch.ones(1), torch.zeros(1)))

    def estimate(m) -> torch.Tensor:
        return denoised(m, F.conditioning(family, batch=1, seed=0), x0, sigma, noise)

    def error(m) -> float:
        return (((estimate(m) - x0) / c_out) ** 2).mean().item()

    options = pack("tlora.options").TrainingOptions(
        method=method,
        residual_rank=4,
        steps=3 if big else 8,
        learning_rate=1e-2,
        rotation_learning_rate=1e-2,
        targets=targets,
        seed=0,
    )
    name = f"families/{family.key}_{method}.safetensors"
    output = comfy.dirs.loras / name
    output.unlink(missing_ok=True)
    result = pack("nodes.train").train(model, {"samples": x0}, options, positive=F.conditioning(family), output=output)
    assert all(map(math.isfinite, result.losses)) and len(result.losses) == options.steps
    before, after = error(model), error(result.model)
    assert after < before, f"{family.title}/{method}: the trained model denoises its image no better"

    # The file, four ways: Apply TLoRA's node, the stock loader, the bypass loader (where the host has it).
    trained = estimate(result.model)
    (via_node, _) = pack("nodes.apply").ApplyTLoRA.execute(model, name, 1.0, 0.0).args
    tensors = pack("tlora.format").load_adapter_file(output).tensors
    via_stock = sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)[0]
    outputs = {"node": via_node, "stock": via_stock}
    if hasattr(sd, "load_bypass_lora_for_models"):
        outputs["bypass"] = sd.load_bypass_lora_for_models(model, None, tensors, 1.0, 0.0)[0]
    for how, patched in outputs.items():
        assert relative_error(estimate(patched), trained) < 1e-4, how

    info = pack("tlora.format").describe(pack("tlora.format").load_adapter_file(output))
    assert info["base_model"] == family.config_class and info["method"] == method
    report = pack("nodes.export").export_for_model(
        model, name, 4096, "lora", f"families/{family.key}_{method}_lora", True
    )
    assert report.max_error < 1e-4  # full rank: exact


@pytest.mark.parametrize("method", METHODS[1:])
def test_every_method_on_a_family_layer_applies_three_ways_and_exports(loaded, family, comfy, method):
    """Each method's file for one of the family's own attention layers (the smallest) applies
    through Apply TLoRA, the stock loader and the bypass loader as its merged weight W', and
    exports exactly: on every family, also those too big to train every method here (above)."""
    from comfy import sd

    model = loaded.model
    architecture = pack("nodes.apply").architecture_names(model)
    layers = pack("tlora.model").select_modules(model.model.diffusion_model, ["attention"], architecture=architecture)
    names = [min(sorted(layers), key=lambda n: layers[n].weight.numel())]  # the smallest: SODA's SVDs cost
    keys = [f"diffusion_model.{n}.weight" for n in names]
    width = min(layers[names[0]].weight.shape)
    if method in ("soda", "svdiff") and width > SVD_WIDTH and not os.environ.get("TLORA_SLOW_TESTS"):
        pytest.skip(
            f"{method} on {family.title}: an fp64 SVD of its {width}-wide layer takes minutes on a CPU thread, "
            "taken on each of the five loads here (set TLORA_SLOW_TESTS=1 to run it)"
        )
    base = {n: w.float() for n, w in zip(names, loaded_state(model, keys).values(), strict=True)}
    adapters = pack("tlora.model").make_adapters({n: layers[n] for n in names}, method, seed=3, residual_rank=4)
    for i, adapter in enumerate(adapters.values()):
        nudge_(adapter, 10 + i)
        adapter.requires_grad_(False)
    expected = {n: adapters[n].merged_weight(base[n]) for n in names}
    name = f"families/{family.key}_{method}_layers.safetensors"
    meta = {"tlora.method": method, "tlora.base_model": family.config_class}
    file = {f"diffusion_model.{n}": a for n, a in adapters.items()}
    pack("tlora.format").save_adapters(comfy.dirs.loras / name, file, meta, overwrite=True)

    tensors = pack("tlora.format").load_adapter_file(comfy.dirs.loras / name).tensors
    merged = {
        "node": pack("nodes.apply").ApplyTLoRA.execute(model, name, 1.0, 0.0).args[0],
        "stock": sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)[0],
    }
    for how, patched in merged.items():
        weights = {n: w.float() for n, w in zip(names, loaded_state(patched, keys).values(), strict=True)}
        for n in names:
            assert (expected[n] - base[n]).abs().max() > 1e-3, f"{method} {n}: an identity adapter"
            assert relative_error(weights[n] - base[n], expected[n] - base[n]) < 1e-3, f"{how} {n}"
    if hasattr(sd, "load_bypass_lora_for_models"):
        import comfy.model_management as mm

        bypassed = sd.load_bypass_lora_for_models(model, None, tensors, 1.0, 0.0)[0]
        mm.load_models_gpu([bypassed], force_full_load=True)
        net = bypassed.model.diffusion_model
        gen = torch.Generator().manual_seed(1)
        for n in names:
            module = net.get_submodule(n)
            x = torch.randn(3, base[n].shape[1], generator=gen).to(module.weight.dtype)
            with torch.no_grad():
                got = module(x).float()
                bias = None if module.bias is None else module.bias.float()
                want = torch.nn.functional.linear(x.float(), expected[n], bias)
                unchanged = torch.nn.functional.linear(x.float(), base[n], bias)
            assert relative_error(got - unchanged, want - unchanged) < 1e-3, f"bypass {n}"

    report = pack("nodes.export").export_for_model(
        model, name, 4096, "lora", f"families/{family.key}_{method}_layers_lora", True
    )
    assert report.max_error < 1e-4  # full rank: exact


def test_a_file_for_another_family_is_refused_naming_both(loaded, family, tiny_sd15, comfy):
    """An adapter trained on this family, applied to SD1.5 (and an SD1.5 one applied here)."""
    architecture = pack("nodes.apply").architecture_names(loaded.model)
    layers = pack("tlora.model").select_modules(
        loaded.model.model.diffusion_model, ["attention"], architecture=architecture
    )
    tlora_cls = pack("tlora.adapters").TLoRA
    adapters = {f"diffusion_model.{n}": tlora_cls(tuple(m.weight.shape)) for n, m in layers.items()}
    name = f"families/{family.key}_foreign.safetensors"
    meta = {"tlora.method": "tlora", "tlora.base_model": family.config_class}
    pack("tlora.format").save_adapters(comfy.dirs.loras / name, adapters, meta, overwrite=True)
    sd15 = pack("tlora.model").select_modules(tiny_sd15.model.model.diffusion_model, ["attention"])
    sd15_adapters = {f"diffusion_model.{n}": tlora_cls(tuple(m.weight.shape)) for n, m in sd15.items()}
    sd15_name = "families/sd15_foreign.safetensors"
    sd15_meta = {"tlora.method": "tlora", "tlora.base_model": "SD15"}
    pack("tlora.format").save_adapters(comfy.dirs.loras / sd15_name, sd15_adapters, sd15_meta, overwrite=True)
    apply = pack("nodes.apply").ApplyTLoRA.execute
    with pytest.raises(ValueError, match=f"made for {family.config_class}; this model is SD15"):
        apply(tiny_sd15.model, name, 1.0, 0.0)
    with pytest.raises(ValueError, match=f"made for SD15; this model is {family.config_class}"):
        apply(loaded.model, sd15_name, 1.0, 0.0)
