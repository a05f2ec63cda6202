"""Apply TLoRA and TLoRA Info on a real ComfyUI (issue #4): exact merged weights, linear strength, the
stock Load LoRA node's result, stacking with a LoRA, lowvram, fp16, clear errors, and the example workflow.

Adapters come from the pack's core (``comfyui_tlora.tlora``) on the tiny SD1.5 UNet's attention layers,
nudged off their identity init and saved once per module into ``loras/test_apply/``. Patched weights are
read the way sampling sees them: after ``comfy.model_management.load_models_gpu`` loaded the patcher.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from .checks import loaded_state, nudge_, relative_error
from .server import ComfyServerError
from .test_server import png_size
from .workflow import load_workflow, ui_to_api

EXAMPLE = Path(__file__).resolve().parents[2] / "example_workflows" / "apply_tlora.json"
SUB = "test_apply"  # subfolder of the loras folder holding this module's files
METHODS = ("tlora", "tlora_star", "transform", "residual", "lora", "soda", "svdiff")
UNET = "diffusion_model."
CLIP_LAYER0 = ".encoder.layers.0.self_attn."
SDXL_ONLY = [  # SDXL UNet modules (depth-2 transformers, level 2) that the tiny SD1.5 UNet lacks
    "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q",
    "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_k",
    "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_q",
    "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_out.0",
]
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float16: {"rtol": 1e-3, "atol": 1e-5}}


def core(name: str):
    """A module of the pack's core as imported in-process (the classes the nodes use)."""
    return importlib.import_module(f"comfyui_tlora.tlora.{name}")


def pack_nodes():
    return importlib.import_module("comfyui_tlora.nodes.apply")


def file_name(stem: str) -> str:
    return f"{SUB}/{stem}.safetensors"


def apply(model, stem_or_name: str, strength_model=1.0, strength_clip=1.0, clip=None, **kw):
    """Apply TLoRA through its node class; returns (MODEL, CLIP)."""
    name = stem_or_name if stem_or_name.endswith(".safetensors") else file_name(stem_or_name)
    out = pack_nodes().ApplyTLoRA.execute(
        model=model, adapter_name=name, strength_model=strength_model, strength_clip=strength_clip, clip=clip, **kw
    )
    return out.result


def comfy_cast(weight32: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """ComfyUI's own cast of an fp32 patched weight back to the model dtype (ModelPatcher.patch_weight_to_device)."""
    import comfy.float
    from comfy.model_patcher import string_to_seed

    return comfy.float.stochastic_rounding(weight32, dtype, seed=string_to_seed(key))


def assert_weights(actual: torch.Tensor, expected32: torch.Tensor, key: str):
    assert torch.isfinite(actual).all(), key
    expected = comfy_cast(expected32, actual.dtype, key)
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[actual.dtype], msg=lambda m: f"{key}: {m}")


def make(modules: dict, method: str, seed: int = 0, prefix: str = UNET) -> dict:
    adapters = core("model").make_adapters(modules, method, seed=seed)
    for i, adapter in enumerate(adapters.values()):
        nudge_(adapter, seed * 1000 + i)
    return {prefix + name: adapter for name, adapter in adapters.items()}


def save(loras: Path, stem: str, adapters: dict, method: str, base_model: str = "SD15") -> str:
    meta = {"tlora.method": method, "tlora.base_model": base_model, "tlora.targets": json.dumps(["attention"])}
    core("format").save_adapters(loras / file_name(stem), adapters, meta, overwrite=True)
    return file_name(stem)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread while this module runs: SODA's fp64 SVDs (taken on every load of a SODA file) slow
    down ~40x with 2 threads on a busy 2-core CPU (OpenMP workers spin-wait on cores others hold)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(comfy, tiny_sd15) -> SimpleNamespace:
    """Base weights, the adapted layers, and every adapter file this module uses (written once)."""
    import comfy.model_management as mm
    import safetensors.torch

    # Whatever an earlier test left loaded, the base patchers hold the checkpoint's own weights once loaded.
    mm.load_models_gpu([tiny_sd15.model, tiny_sd15.clip.patcher], force_full_load=True)
    unet_modules = core("model").select_modules(tiny_sd15.model.model.diffusion_model)
    clip_modules = {
        n: m
        for n, m in core("model").select_modules(tiny_sd15.clip.cond_stage_model, ["text_attention"]).items()
        if CLIP_LAYER0 in n
    }
    assert len(unet_modules) == 32 and len(clip_modules) == 4
    keys = [f"{UNET}{n}.weight" for n in unet_modules]
    clip_keys = [f"{n}.weight" for n in clip_modules]
    base = {UNET + n + ".weight": m.weight.detach().clone() for n, m in unet_modules.items()}

    loras = comfy.dirs.loras
    adapters = {method: make(unet_modules, method, seed=i + 1) for i, method in enumerate(METHODS)}
    names = {method: save(loras, method, adapters[method], method) for method in METHODS}
    mixed = {**adapters["tlora"], **make(clip_modules, "tlora", seed=9, prefix="text_encoders.")}
    save(loras, "mixed_unet_clip", mixed, "tlora")

    # An ordinary LoRA file (the standard key names, as any trainer writes them) on the q and v projections.
    gen = torch.Generator().manual_seed(7)
    lora, lora_layers = {}, [n for n in unet_modules if n.endswith(("to_q", "to_v"))]
    for n in lora_layers:
        out_f, in_f = unet_modules[n].weight.shape
        lora[f"{UNET}{n}.lora_up.weight"] = 0.1 * torch.randn(out_f, 4, generator=gen)
        lora[f"{UNET}{n}.lora_down.weight"] = 0.1 * torch.randn(4, in_f, generator=gen)
        lora[f"{UNET}{n}.alpha"] = torch.tensor(2.0)
    safetensors.torch.save_file(lora, str(loras / file_name("plain_lora")))

    # Bad files.
    good = (loras / names["tlora"]).read_bytes()
    (loras / file_name("bad_truncated")).write_bytes(good[: len(good) // 2])
    (loras / file_name("bad_random")).write_bytes(
        torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    )
    safetensors.torch.save_file({"model.layer.weight": torch.ones(3, 3)}, str(loras / file_name("bad_not_adapter")))
    tlora_cls, preset = core("adapters.tlora").TLoRA, core("adapters.tlora").preset
    sdxl = {name: tlora_cls((640, 640), preset("tlora")) for name in SDXL_ONLY}
    save(loras, "bad_sdxl", sdxl, "tlora", base_model="SDXL")
    two_ours = dict(list(adapters["tlora"].items())[:2])
    save(loras, "bad_partial", {**two_ours, **sdxl}, "tlora", base_model="SDXL")
    wide = {UNET + n: tlora_cls((640, 640), preset("tlora")) for n in list(unet_modules)[:4]}
    save(loras, "bad_640_wide", wide, "tlora", base_model="SDXL")
    # SODA whose first 5 layers were trained on other base weights (a fine-tune of this checkpoint, say).
    soda_cls, soda_preset = core("adapters.soda").SODA, core("adapters.soda").soda_preset
    other = {}
    for i, (name, w) in enumerate(base.items()):
        adapter = soda_cls(tuple(w.shape), soda_preset("soda"))
        adapter.bind(w + 0.01 * torch.randn(w.shape, generator=gen) if i < 5 else w)
        nudge_(adapter, 500 + i)
        other[name.removesuffix(".weight")] = adapter
    save(loras, "soda_other_base", other, "soda")

    return SimpleNamespace(
        loras=loras,
        model=tiny_sd15.model,
        clip=tiny_sd15.clip,
        keys=keys,
        clip_keys=clip_keys,
        base=base,
        base_unet_state={k: v.clone() for k, v in loaded_state(tiny_sd15.model).items()},
        base_clip_state={k: v.clone() for k, v in loaded_state(tiny_sd15.clip.patcher).items()},
        adapters=adapters,
        names=names,
        lora=lora,
        lora_layers=[f"{UNET}{n}.weight" for n in lora_layers],
    )


def merged(setup, method: str, key: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The core's W' (fp32) of ``method``'s adapter for ``key``, on the base weight or on ``weight``."""
    return setup.adapters[method][key.removesuffix(".weight")].merged_weight(
        setup.base[key] if weight is None else weight
    )


def assert_state_equal(actual: dict, expected: dict, where: str):
    assert actual.keys() == expected.keys()
    differ = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not differ, f"{where}: {len(differ)} weights changed, e.g. {differ[:3]}"


# -- 1-3: strength 0, 1, linear ----------------------------------------------------------------------------


def test_strength_zero_is_bit_identical_to_base(setup):
    model, clip = apply(setup.model, "mixed_unet_clip", 0.0, 0.0, clip=setup.clip)
    assert model is setup.model and clip is setup.clip
    assert_state_equal(loaded_state(model), setup.base_unet_state, "both strengths 0, UNet")
    assert_state_equal(loaded_state(clip.patcher), setup.base_clip_state, "both strengths 0, CLIP")

    # strength_model 0 alone: the UNet is the base bit for bit while the text encoder is patched.
    model, clip = apply(setup.model, "mixed_unet_clip", 0.0, 1.0, clip=setup.clip)
    assert model is not setup.model
    assert_state_equal(loaded_state(model), setup.base_unet_state, "strength_model 0, UNet")
    clip_state = loaded_state(clip.patcher)
    for key in setup.clip_keys:
        assert not torch.equal(clip_state[key], setup.base_clip_state[key]), key
    untouched = {k: v for k, v in clip_state.items() if k not in setup.clip_keys}
    assert_state_equal(untouched, {k: setup.base_clip_state[k] for k in untouched}, "strength_model 0, CLIP rest")


@pytest.mark.parametrize("method", METHODS)
def test_strength_one_is_the_core_merged_weight(setup, method):
    (model, _) = apply(setup.model, method)
    state = loaded_state(model)
    for key in setup.keys:
        expected = merged(setup, method, key)
        assert (expected - setup.base[key]).abs().max() > 1e-3, f"{method} {key}: the adapter is an identity"
        assert state[key].dtype == setup.base[key].dtype
        assert_weights(state[key], expected, key)
    others = {k: v for k, v in state.items() if k not in setup.keys}
    assert_state_equal(others, {k: setup.base_unet_state[k] for k in others}, f"{method}: non-adapted layers")


@pytest.mark.parametrize("method", METHODS)
def test_strength_is_linear(setup, method):
    for strength in (0.5, -1.0):
        (model, _) = apply(setup.model, method, strength_model=strength)
        state = loaded_state(model, setup.keys)
        for key in setup.keys:
            w = setup.base[key]
            assert_weights(state[key], w + strength * (merged(setup, method, key) - w), f"{method} s={strength} {key}")


# -- 4-5: the stock loader, stacking ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_stock_lora_loader_gives_the_same_weights(setup, method):
    (stock_model, _) = (
        importlib.import_module("nodes").LoraLoader().load_lora(setup.model, setup.clip, setup.names[method], 0.7, 0.7)
    )
    (ours_model, _) = apply(setup.model, method, 0.7, 0.7, clip=setup.clip)
    stock = loaded_state(stock_model, setup.keys)
    ours = loaded_state(ours_model, setup.keys)
    for key in setup.keys:
        assert torch.equal(stock[key], ours[key]), f"{method} {key}"
        assert not torch.equal(ours[key], setup.base[key]), f"{method} {key}"


@pytest.mark.parametrize("method", ["tlora", "residual"])  # "lora" files are ComfyUI's own LoRA format
def test_same_shaped_layers_merge_from_one_batched_build(setup, method):
    """A TLoRA-family file's layers share one GroupedMerge (tlora.batched_merge). On CUDA (its
    default) each group of same-shaped layers' factors is built once, not once per layer; made
    to run on this CPU it gives the core's weights; on the CPU by default it stays off."""
    (model, _) = apply(setup.model, method)
    loaded_state(model, [])
    merges = {id(patch[1].merge): patch[1].merge for key in setup.keys for patch in model.patches[key]}
    assert len(merges) == 1, "one file, one GroupedMerge"
    (merge,) = merges.values()
    assert merge.builders.keys() >= {id(patch[1]) for key in setup.keys for patch in model.patches[key]}
    assert merge.batched_builds == 0, "off on the CPU by default"

    (model, _) = apply(setup.model, method)
    (merge,) = {id(patch[1].merge): patch[1].merge for key in setup.keys for patch in model.patches[key]}.values()
    merge.devices = ("cpu",)
    try:
        state = loaded_state(model, setup.keys)
    finally:
        merge.devices = ("cuda",)
    for key in setup.keys:
        assert_weights(state[key], merged(setup, method, key), key)
    shapes = {tuple(setup.base[key].shape[:2]) for key in setup.keys}
    assert 1 <= merge.batched_builds <= len(shapes) < len(setup.keys), (merge.batched_builds, len(shapes))


def lora_delta(setup, key: str) -> torch.Tensor:
    module = key.removesuffix(".weight")
    up, down = setup.lora[f"{module}.lora_up.weight"], setup.lora[f"{module}.lora_down.weight"]
    return (float(setup.lora[f"{module}.alpha"]) / up.shape[1]) * (up @ down)


def file_adapter(setup, name: str, key: str, weight: torch.Tensor):
    """The adapter for ``key`` rebuilt from file ``name``, as ComfyUI's loader rebuilds it, bound to
    ``weight`` (a SODA takes its SVD of the weight it patches)."""
    fmt = core("format")
    group = fmt.load_adapter_file(setup.loras / name).modules[key.removesuffix(".weight")]
    adapter = fmt.build_adapter(tuple(weight.shape), group)
    if hasattr(adapter, "bind"):
        adapter.bind(weight, on_mismatch="ignore")
    return adapter


@pytest.mark.parametrize("method", ["tlora", "soda"])
@pytest.mark.filterwarnings("ignore:SODA adapter was trained on different base weights")
def test_stacking_with_a_lora_is_sequential(setup, method):
    loader = importlib.import_module("nodes").LoraLoader()
    # LoRA first, then TLoRA: W' of the LoRA-patched weight. The LoRA-patched clone is loaded (patched in
    # place) when Apply TLoRA runs: its SODA fingerprint check must still see the checkpoint's own weights.
    (with_lora, _) = loader.load_lora(setup.model, None, file_name("plain_lora"), 1.0, 0)
    lora_state = loaded_state(with_lora, setup.keys)
    (lora_then_tlora, _) = apply(with_lora, method)
    first = loaded_state(lora_then_tlora, setup.keys)
    # TLoRA first, then LoRA: the LoRA's B·A added to the merged weight.
    (tlora_then_lora, _) = loader.load_lora(apply(setup.model, method)[0], None, file_name("plain_lora"), 1.0, 0)
    second = loaded_state(tlora_then_lora, setup.keys)

    for key in setup.keys:
        w = setup.base[key]
        w_lora = w + lora_delta(setup, key) if key in setup.lora_layers else w
        torch.testing.assert_close(lora_state[key], w_lora, **TOLERANCE[torch.float32])
        assert_weights(first[key], file_adapter(setup, setup.names[method], key, w_lora).merged_weight(w_lora), key)
        w_second = merged(setup, method, key) + (lora_delta(setup, key) if key in setup.lora_layers else 0)
        assert_weights(second[key], w_second, key)
    order_matters = [k for k in setup.lora_layers if not torch.allclose(first[k], second[k], rtol=0, atol=1e-5)]
    assert order_matters, "the two orders should differ where the transform meets the LoRA"


# -- 6-7: lowvram, fp16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tlora", "soda"])
def test_lowvram_patching_matches_full_load(setup, method):
    import comfy.model_management as mm

    gen = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 768, generator=gen)
    sigma = torch.tensor([7.0])

    def forward(mp):
        with torch.inference_mode():
            return mp.model.apply_model(x, sigma, c_crossattn=context).float()

    loaded_state(setup.model, [])
    base = forward(setup.model)
    (mp, _) = apply(setup.model, method)
    loaded_state(mp, [])
    full = forward(mp)

    mm.unload_all_models()  # unpatches: the shared UNet holds the base weights again
    cpu = torch.device("cpu")
    try:
        mp.patch_model(device_to=cpu, lowvram_model_memory=1)  # every layer lowvram: patched as it runs
        assert mp.model.model_lowvram and mp.lowvram_patch_counter() == len(setup.keys)
        state = mp.model.state_dict()
        for key in setup.keys:
            assert torch.equal(state[key], setup.base[key]), f"{key} was patched in place, not on the fly"
        low = forward(mp)
    finally:
        mp.unpatch_model(cpu)
    assert torch.isfinite(low).all()
    assert (full - base).abs().max() > 1e-3, "the adapter does not change the output"
    torch.testing.assert_close(low, full, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fp16_model(setup, tiny_checkpoint):
    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(
        str(tiny_checkpoint), output_vae=False, output_clip=False, model_options={"dtype": torch.float16}
    )[0]
    assert next(model.model.diffusion_model.parameters()).dtype == torch.float16
    return model


@pytest.mark.parametrize("method", METHODS)
def test_fp16_weights_patch_like_fp32(setup, fp16_model, method):
    (model16, _) = apply(fp16_model, method)
    (model32, _) = apply(setup.model, method)
    w16 = loaded_state(model16, setup.keys)
    w32 = loaded_state(model32, setup.keys)
    for key in setup.keys:
        assert w16[key].dtype == torch.float16
        assert_weights(w16[key], merged(setup, method, key), key)  # its fp16 cast, within an fp16 ulp
        torch.testing.assert_close(w16[key].float(), w32[key], rtol=2e-3, atol=1e-4)


# -- 8-9: bad inputs, Info ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stem", "message"),
    [
        ("no_such_adapter", r"'test_apply/no_such_adapter.safetensors' is not in ComfyUI's loras folders"),
        ("bad_truncated", r"bad_truncated.safetensors is not a readable safetensors file \(truncated"),
        ("bad_random", r"bad_random.safetensors is not a readable safetensors file"),
        ("bad_not_adapter", r"bad_not_adapter.safetensors holds no TLoRA, SODA or LoRA tensors .*model.layer.weight"),
        (
            "bad_sdxl",
            r"bad_sdxl.safetensors: 0 of 4 modules match a layer of this model .*made for SDXL; this model is SD15",
        ),
        ("bad_partial", r"bad_partial.safetensors: 2 of 6 modules match a layer of this model"),
        (
            "bad_640_wide",
            r"bad_640_wide.safetensors: 4 of 4 modules do not fit this model's weights "
            r".*input widths disagree: tlora.transform 640, .*the layer 320\).*made for SDXL",
        ),
        ("soda_other_base", r"soda_other_base.safetensors: 5 of 32 SODA layers were trained on different base weights"),
    ],
)
def test_bad_input_names_the_problem(setup, stem, message):
    with pytest.raises(ValueError, match=message) as err:
        apply(setup.model, stem, clip=setup.clip)
    if stem == "soda_other_base":
        assert "on_fingerprint_mismatch" in str(err.value)


def test_soda_fingerprint_mismatch_can_warn(setup, caplog):
    with caplog.at_level(logging.WARNING, logger="comfyui-tlora"):
        (model, _) = apply(setup.model, "soda_other_base", on_fingerprint_mismatch="warn")
    assert any("5 of 32 SODA layers" in r.getMessage() and "anyway" in r.getMessage() for r in caplog.records)
    with pytest.warns(UserWarning, match="trained on different base weights"):  # ComfyUI's loader warns too
        state = loaded_state(model, setup.keys)
    for key in setup.keys:  # applied anyway: each layer's SODA on the SVD of this model's weight
        expected = file_adapter(setup, file_name("soda_other_base"), key, setup.base[key]).merged_weight(
            setup.base[key]
        )
        assert_weights(state[key], expected, key)
        assert not torch.equal(state[key], setup.base[key])
    with pytest.raises(ValueError, match="on_fingerprint_mismatch"):
        apply(setup.model, "soda_other_base", on_fingerprint_mismatch="ignore")


def info(name: str) -> dict[str, str]:
    out = pack_nodes().TLoRAInfo.execute(adapter_name=name)
    assert out.ui is not None
    return dict(line.split(": ", 1) for line in out.result[0].splitlines())


@pytest.mark.parametrize("method", ["tlora", "soda", "lora"])
def test_info_describes_a_saved_file(setup, method):
    got = info(setup.names[method])
    params = sum(a.num_parameters() for a in setup.adapters[method].values())
    assert got["method"] == method and got["parameters"] == str(params) and params > 0
    assert got["modules"] == "32" and got["base_model"] == "SD15" and got["targets"] == "['attention']"
    assert got["format_version"] == "1"


def test_info_on_a_plain_lora_and_a_bad_file(setup):
    got = info(file_name("plain_lora"))
    assert got["method"] == "lora" and got["modules"] == str(len(setup.lora_layers))
    assert got["parameters"] == str(sum(t.numel() for t in setup.lora.values() if t.ndim))
    assert got["base_model"] == "unknown" and got["format_version"].startswith("none")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        info(file_name("bad_random"))


# -- 10: the real server ------------------------------------------------------------------------------------


def example_prompt(server, adapter_name: str) -> dict:
    prompt = ui_to_api(load_workflow(EXAMPLE), server.object_info(), strict=True)
    nodes = {}
    for node in prompt.values():
        nodes.setdefault(node["class_type"], []).append(node["inputs"])
    assert sorted(len(v) for v in nodes.values()) == [1, 1, 1, 1, 1, 1, 2]
    nodes["CheckpointLoaderSimple"][0]["ckpt_name"] = "tiny_sd15.safetensors"
    nodes["TLoRAApply"][0]["adapter_name"] = adapter_name
    nodes["EmptyLatentImage"][0].update(width=64, height=64)
    nodes["KSampler"][0]["steps"] = 2
    return prompt


def test_example_workflow_is_served_and_wired(comfy_server):
    module = comfy_server.pack_dir_name
    assert "apply_tlora" in comfy_server._request("GET", "/workflow_templates")[module]
    assert comfy_server._request("GET", f"/api/workflow_templates/{module}/apply_tlora.json") == load_workflow(EXAMPLE)
    wf = load_workflow(EXAMPLE)
    assert wf["version"] == 0.4 and any(n["type"] == "Note" for n in wf["nodes"])
    prompt = ui_to_api(wf, comfy_server.object_info(), strict=True)
    apply_node = next(n for n in prompt.values() if n["class_type"] == "TLoRAApply")
    assert apply_node["inputs"]["strength_model"] == 1.0 and apply_node["inputs"]["strength_clip"] == 1.0
    assert apply_node["inputs"]["on_fingerprint_mismatch"] == "refuse"
    ref = {node["class_type"]: node_id for node_id, node in prompt.items()}
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    assert sampler["model"] == [ref["TLoRAApply"], 0]
    assert [sampler[k] for k in ("steps", "cfg", "sampler_name", "scheduler")] == [20, 7, "euler", "normal"]
    encoders = [n["inputs"] for n in prompt.values() if n["class_type"] == "CLIPTextEncode"]
    assert all(e["clip"] == [ref["TLoRAApply"], 1] for e in encoders)
    latent = next(n for n in prompt.values() if n["class_type"] == "EmptyLatentImage")["inputs"]
    assert (latent["width"], latent["height"], latent["batch_size"]) == (512, 512, 1)
    options = comfy_server.object_info("TLoRAApply")["input"]["optional"]["on_fingerprint_mismatch"]
    assert options[1]["options"] == ["refuse", "warn"] and options[1]["default"] == "refuse"


def test_example_workflow_runs_to_an_image(setup, comfy_server):
    # UNet and text-encoder layers: both patchers are patched in the server.
    history = comfy_server.run(example_prompt(comfy_server, file_name("mixed_unet_clip")), timeout=120)
    files = comfy_server.output_files(history)
    assert len(files) == 1 and files[0].is_file() and png_size(files[0]) == (64, 64)


def test_bad_adapter_name_is_refused_at_the_prompt_with_the_packs_message(setup, comfy_server):
    """Both ComfyUI versions refuse the prompt before running it, through the node's validate_inputs,
    with the pack's message (0.33 would otherwise say only "Value not in list")."""
    prompt = example_prompt(comfy_server, file_name("missing"))
    with pytest.raises(ComfyServerError, match=r"adapter_name - adapter file '.*missing.safetensors' is not in"):
        comfy_server.run(prompt, timeout=120)
    assert comfy_server.proc.poll() is None
    assert "TLoRAApply" in comfy_server.object_info(refresh=True)
    history = comfy_server.run({"1": {"class_type": "TLoRAInfo", "inputs": {"adapter_name": setup.names["soda"]}}})
    assert "method: soda" in json.dumps(history["outputs"]["1"])


# -- 8: ComfyUI's bypass loaders (ComfyUI ≥ 0.11) ---------------------------------------------------------
# "Load LoRA (Bypass)" and comfy.sd.load_bypass_lora_for_models run the adapters around the frozen layers
# instead of merging them: the output must be the merged model's, for every method, at any strength.

GEN = torch.Generator().manual_seed(11)
X, CONTEXT, SIGMA = (
    torch.randn(2, 4, 8, 8, generator=GEN),
    torch.randn(2, 77, 768, generator=GEN),
    torch.tensor([5.0, 9.0]),
)


def bypass_loader():
    import comfy.sd

    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):
        pytest.skip("this ComfyUI has no bypass loader (added in 0.11)")
    return comfy.sd.load_bypass_lora_for_models


def bypass_output(patcher) -> torch.Tensor:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    with torch.inference_mode():
        return patcher.model.apply_model(X, SIGMA, c_crossattn=CONTEXT).float()


def file_tensors(setup, *stems) -> dict:
    import safetensors.torch

    out = {}
    for stem in stems:
        out.update(safetensors.torch.load_file(str(setup.loras / file_name(stem))))
    return out


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
@pytest.mark.parametrize("method", METHODS)
def test_bypass_output_equals_the_merged_model(setup, method, strength):
    import comfy.sd

    load_bypass = bypass_loader()
    lora = file_tensors(setup, method)
    merged = bypass_output(comfy.sd.load_lora_for_models(setup.model, None, lora, strength, 0.0)[0])
    bypassed_model = load_bypass(setup.model, None, lora, strength, 0.0)[0]
    bypassed = bypass_output(bypassed_model)
    base = bypass_output(setup.model)
    assert relative_error(merged, base) > 1e-3, "the adapter must change the output"
    assert relative_error(bypassed, merged) < 1e-5
    state = bypassed_model.model.state_dict()
    assert all(torch.equal(state[k], setup.base[k]) for k in setup.keys), "bypass must not merge weights"


@pytest.mark.parametrize("ours", ["tlora", "soda"])
def test_bypass_stacks_on_merged_adapters_in_order(setup, ours):
    """A bypassed layer wraps the layer as patched so far, so a stack gives the merged stack in
    the same order: LoRA merged then ours bypassed is ((W + BA)·T + sΔ), and ours merged then a
    LoRA bypassed is (W·T + sΔ + BA). (ComfyUI keeps one bypass set per model: a second bypass
    load replaces the first, for its own LoRAs too.)"""
    import comfy.sd

    load_bypass = bypass_loader()
    load = comfy.sd.load_lora_for_models
    lora, mine = file_tensors(setup, "plain_lora"), file_tensors(setup, ours)
    for first, second in ((lora, mine), (mine, lora)):
        merged = bypass_output(load(load(setup.model, None, first, 0.8, 0.0)[0], None, second, 1.0, 0.0)[0])
        stacked = bypass_output(load_bypass(load(setup.model, None, first, 0.8, 0.0)[0], None, second, 1.0, 0.0)[0])
        assert relative_error(stacked, merged) < 1e-5


def test_bypass_node_applies_a_tlora_file(setup):
    bypass_loader()
    nodes = importlib.import_module("comfy_extras.nodes_lora_debug")
    (model, _) = nodes.LoraLoaderBypass().load_lora(setup.model, setup.clip, file_name("tlora"), 1.0, 0.0)
    (merged, _) = apply(setup.model, "tlora")
    assert relative_error(bypass_output(model), bypass_output(merged)) < 1e-5
