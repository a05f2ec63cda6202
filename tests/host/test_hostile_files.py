"""Hostile adapter files on a real ComfyUI (issue 17): Apply TLoRA, TLoRA Info and Export refuse each
with the validator's message (file, module, problem); ComfyUI's own loaders (Load LoRA, and the bypass
loader where the host has it) take the rest of the file and leave the bad module unpatched with that
message in the log, never an exception in the loader or the sampler; nothing non-finite reaches a weight.

The files are the report's cases, each one mutation of a valid TLoRA (or SODA) file of the tiny SD1.5's
attention layers, saved with a valid checksum so that the validator, not the checksum, refuses them.
"""

from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

from .checks import loaded_state
from .test_apply import UNET, apply, bypass_loader, bypass_output, file_name, make

Q = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # [320, 320]
K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # [320, 768]
CASES = {  # stem → (method of the file, mutation of its tensors, what the message says)
    "h_nan_weight": ("tlora", lambda t: t[f"{Q}.tlora.residual_in.1"].view(-1).__setitem__(5, float("nan")), "NaN"),
    "h_nan_scale": ("tlora", lambda t: t.update({f"{Q}.tlora.scale": torch.tensor(float("nan"))}), "tlora.scale"),
    "h_lora_mid": ("tlora", lambda t: t.update({f"{Q}.tlora.lora_mid": torch.zeros(4)}), "unexpected key"),
    "h_added_up": ("tlora", lambda t: t.update({f"{Q}.tlora.lora_up": torch.zeros(320, 2)}), "cannot be combined"),
    "h_ring_1500": ("tlora", lambda t: t.update({f"{Q}.tlora.residual_out.0": torch.zeros(0, 1500, 1500)}), "empty"),
    "h_fp16_print": ("soda", lambda t: t.update({f"{Q}.soda.base_fingerprint": torch.tensor(3.0).half()}), "dtype"),
    "h_wrong_layer": ("tlora", lambda t: move(t, K, Q), "input widths disagree"),
    "h_rank_beyond": (
        "tlora_star",
        lambda t: t.update(
            {f"{Q}.tlora.lora_up": torch.zeros(320, 330), f"{Q}.tlora.lora_down": torch.zeros(330, 320)}
        ),
        "LoRA rank 330 is outside 1..320",
    ),
}
LAYER_LEVEL = {"h_wrong_layer"}  # fine as a file; refused against the layer it names


def core(name: str):
    return importlib.import_module(f"comfyui_tlora.tlora.{name}")


def move(tensors: dict, source: str, target: str) -> None:
    """``source``'s group written under ``target`` (a layer of another shape), ``target``'s dropped."""
    for key in [k for k in tensors if k.startswith(target + ".")]:
        del tensors[key]
    for key in [k for k in tensors if k.startswith(source + ".")]:
        tensors[target + key[len(source) :]] = tensors[key].clone()


@pytest.fixture(scope="module")
def hostile(comfy, tiny_sd15) -> SimpleNamespace:
    import comfy.model_management as mm

    mm.load_models_gpu([tiny_sd15.model], force_full_load=True)
    fmt = core("format")
    modules = core("model").select_modules(tiny_sd15.model.model.diffusion_model)
    base = {f"{UNET}{n}.weight": m.weight.detach().clone() for n, m in modules.items()}
    good = {method: fmt.module_tensors(make(modules, method)) for method in ("tlora", "tlora_star", "soda")}
    for stem, (method, mutate, _) in CASES.items():
        tensors = {k: v.clone() for k, v in good[method].items()}
        mutate(tensors)
        meta = {"tlora.method": method, "tlora.format_version": "1"}
        meta[fmt.CHECKSUM_KEY] = fmt.checksum(tensors, meta)
        path = comfy.dirs.loras / file_name(stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt.write_safetensors(path, tensors, meta, overwrite=True)
    return SimpleNamespace(model=tiny_sd15.model, clip=tiny_sd15.clip, base=base, good=good)


@pytest.mark.parametrize("stem", list(CASES))
def test_apply_tlora_refuses_with_the_validators_message(hostile, stem):
    with pytest.raises(ValueError) as err:
        apply(hostile.model, stem)
    message = str(err.value)
    assert f"{stem}.safetensors" in message and Q in message and CASES[stem][2] in message, message


@pytest.mark.parametrize("stem", ["h_nan_scale", "h_ring_1500", "h_lora_mid"])
def test_info_and_export_refuse_too(hostile, stem):
    with pytest.raises(ValueError, match=rf"{stem}\.safetensors: {Q}: "):
        importlib.import_module("comfyui_tlora.nodes.apply").TLoRAInfo.execute(adapter_name=file_name(stem))
    export = importlib.import_module("comfyui_tlora.nodes.export").export_for_model
    with pytest.raises(ValueError, match=rf"{stem}\.safetensors: {Q}: "):
        export(hostile.model, file_name(stem), 8, "lora", f"{stem}_exported", True)


@pytest.mark.parametrize("stem", sorted(set(CASES) - {"h_lora_mid"}))  # a key it does not probe: left to ComfyUI
def test_the_stock_loader_skips_the_bad_module_and_patches_the_rest(hostile, stem, caplog):
    loader = importlib.import_module("nodes").LoraLoader()
    with caplog.at_level(logging.ERROR, logger="comfyui-tlora"):
        (model, _) = loader.load_lora(hostile.model, None, file_name(stem), 1.0, 0.0)
        state = loaded_state(model, list(hostile.base))
    key = f"{Q}.weight"
    assert torch.equal(state[key], hostile.base[key]), "the bad module must be left as it was"
    assert all(torch.isfinite(w).all() for w in state.values())
    patched = [k for k in hostile.base if k != key and not torch.equal(state[k], hostile.base[k])]
    assert len(patched) == 31
    refusals = [r.getMessage() for r in caplog.records if Q in r.getMessage()]
    assert refusals and CASES[stem][2] in refusals[0], refusals
    assert ("not patched" if stem in LAYER_LEVEL else "refused (not applied)") in refusals[0]


@pytest.mark.parametrize("stem", ["h_nan_scale", "h_ring_1500", "h_wrong_layer", "h_rank_beyond"])
def test_the_bypass_loader_runs_the_bad_layer_as_the_base_one(hostile, stem, caplog):
    import safetensors.torch

    load_bypass = bypass_loader()
    lora = safetensors.torch.load_file(str(hostile_path(stem)))
    with caplog.at_level(logging.ERROR, logger="comfyui-tlora"):
        out = bypass_output(load_bypass(hostile.model, None, lora, 1.0, 0.0)[0])
    assert torch.isfinite(out).all()
    assert any(Q in r.getMessage() and CASES[stem][2] in r.getMessage() for r in caplog.records)
    without = {k: v for k, v in lora.items() if not k.startswith(Q + ".")}
    expected = bypass_output(load_bypass(hostile.model, None, without, 1.0, 0.0)[0])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # as if the bad module were absent


def hostile_path(stem: str):
    return importlib.import_module("folder_paths").get_full_path_or_raise("loras", file_name(stem))


def test_the_bypass_loader_checks_sodas_exact_fingerprint(hostile, caplog):
    """ComfyUI's bypass injection casts every adapter tensor to the layer's dtype, the int64
    fingerprint too: the registered adapter keeps it as loaded, so a SODA on its own base weights
    is applied and checked exactly (no refusal for a float fingerprint, no mismatch warning)."""
    import warnings

    load_bypass = bypass_loader()
    with warnings.catch_warnings(), caplog.at_level(logging.ERROR, logger="comfyui-tlora"):
        warnings.simplefilter("error")  # a fingerprint mismatch is a UserWarning
        out = bypass_output(load_bypass(hostile.model, None, dict(hostile.good["soda"]), 1.0, 0.0)[0])
    assert not caplog.records, caplog.text
    base = bypass_output(hostile.model)
    assert torch.isfinite(out).all() and (out - base).norm() > 1e-3 * base.norm()


def registered_patch(adapters, module: str, tensors: dict):
    """What comfy.lora.load_lora keeps for ``module``: the first registered adapter whose load takes it."""
    for adapter in adapters:
        patch = adapter.load(module, tensors, None, None, set())
        if patch is not None:
            return patch
    return None


def layer_of(shape: tuple[int, ...], weight: torch.Tensor) -> torch.nn.Module:
    layer = (
        torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=1) if len(shape) == 4 else torch.nn.Linear(*shape[::-1])
    )
    layer.weight.data = weight.clone()
    return layer


CONV_ARGS = {"stride": 1, "padding": 1, "dilation": 1, "groups": 1}  # what ComfyUI's bypass hook sets for a conv


@pytest.mark.parametrize("method", ["tlora", "tlora_star", "transform", "residual", "soda", "svdiff"])
def test_the_registered_adapters_never_raise_on_fuzzed_groups(comfy, method, caplog):
    """bench/fuzz_files.py's structural mutations (valid checksum, hostile groups) straight through
    the registered adapters as ComfyUI calls them: load, then calculate_weight and bypass_forward on
    layers of each module's shape. Never an exception; every weight and output stays finite."""
    import random

    from comfy import weight_adapter

    from bench.fuzz_files import LAYERS, good_file, structural_mutation

    adapters = [a for a in weight_adapter.adapters if a.__module__.startswith("comfyui_tlora.")]
    tensors, metadata, weights = good_file(method)
    layers = {m: layer_of(shape, weights[m]) for m, shape in LAYERS.items()}
    inputs = {m: torch.randn(2, 4, 6, 6) if len(s) == 4 else torch.randn(2, 5, s[1]) for m, s in LAYERS.items()}
    rng, outcomes = random.Random(f"host:{method}"), {"applied": 0, "refused": 0}
    with caplog.at_level(logging.ERROR, logger="comfyui-tlora"):
        for _ in range(150):
            mutated, _ = structural_mutation(tensors, metadata, rng)
            for module, layer in layers.items():
                patch = registered_patch(adapters, module, mutated)
                if patch is None:
                    outcomes["refused"] += 1
                    continue
                weight = layer.weight.detach().clone()
                weight = patch.calculate_weight(weight, f"{module}.weight", 1.0, 1.0, None, lambda d: d)
                assert torch.isfinite(weight).all()
                patch.kw_dict = CONV_ARGS if isinstance(layer, torch.nn.Conv2d) else {}
                with torch.no_grad():
                    out = patch.bypass_forward(layer.forward, inputs[module])
                assert torch.isfinite(out).all() and out.shape == layer(inputs[module]).shape
                outcomes["applied"] += 1
    assert outcomes["refused"] > 50 and outcomes["applied"] > 50, outcomes
