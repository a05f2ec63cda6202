"""Export TLoRA to LoRA and TLoRA Loss Plot on a real ComfyUI (issue #6).

A TLoRA file on a few attention layers and convs of the tiny SD1.5 UNet is exported at full rank by the
node, from the MODEL's weights; ComfyUI's stock Load LoRA on the exported file must give the UNet weights
that the stock loader gives on the TLoRA file itself (and likewise for the baked diffs).
"""

from __future__ import annotations

import importlib
import json
import math
from types import SimpleNamespace

import pytest
import torch

SUB = "test_export"
UNET = "diffusion_model."


def core(name: str):
    return importlib.import_module(f"comfyui_tlora.tlora.{name}")


def node(module: str):
    return importlib.import_module(f"comfyui_tlora.nodes.{module}")


def loaded_state(patcher, keys):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    state = patcher.model.state_dict()
    return {k: state[k].detach().float().clone() for k in keys}


def stock_lora(model, name: str):
    return importlib.import_module("nodes").LoraLoader().load_lora(model, None, name, 1.0, 0)[0]


def export(model, adapter_name: str, output_name: str, rank: int = 4096, mode: str = "lora", overwrite: bool = True):
    out = node("export").ExportLoRA.execute(
        model=model, adapter_name=adapter_name, rank=rank, mode=mode, output_name=output_name, overwrite=overwrite
    )
    return out


@pytest.fixture(scope="module")
def setup(comfy, tiny_sd15) -> SimpleNamespace:
    model = tiny_sd15.model
    unet = model.model.diffusion_model
    modules = core("model").select_modules(unet, ["attention"], ["*.in_layers.2"])
    attention = [n for n in modules if "attn" in n][:4]
    convs = [n for n in modules if n.endswith("in_layers.2")][:2]
    assert len(attention) == 4 and len(convs) == 2
    chosen = {n: modules[n] for n in attention + convs}
    adapters = core("model").make_adapters(chosen, "tlora", seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter in adapters.values():
            for p in adapter.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    name = f"{SUB}/trained_tlora.safetensors"
    meta = {"tlora.method": "tlora", "tlora.base_model": "SD15", "tlora.targets": json.dumps(["attention"])}
    core("format").save_adapters(
        comfy.dirs.loras / name, {UNET + n: a for n, a in adapters.items()}, meta, overwrite=True
    )
    (comfy.dirs.loras / SUB / "not_an_adapter.safetensors").write_bytes(b"\x00" * 64)
    keys = [f"{UNET}{n}.weight" for n in chosen]
    return SimpleNamespace(model=model, name=name, keys=keys, loras=comfy.dirs.loras, convs=convs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["lora", "bake"])
def test_export_matches_the_stock_loader_on_the_tlora_file(setup, mode):
    out = export(setup.model, setup.name, f"{SUB}/exported_{mode}", mode=mode)
    path, text = out.result
    assert path.endswith(f"exported_{mode}.safetensors") and "overall (6 layers" in text
    exported = f"{SUB}/exported_{mode}.safetensors"
    reference = loaded_state(stock_lora(setup.model, setup.name), setup.keys)
    base = loaded_state(setup.model, setup.keys)
    got = loaded_state(stock_lora(setup.model, exported), setup.keys)
    for key in setup.keys:
        delta = reference[key] - base[key]
        assert delta.norm() > 0, key
        assert rel(got[key] - base[key], delta) < 1e-4, key
    if mode == "lora":
        import safetensors.torch

        tensors = safetensors.torch.load_file(str(setup.loras / exported))
        conv = f"{UNET}{setup.convs[0]}"
        assert tensors[f"{conv}.lora_up.weight"].ndim == 4 and tensors[f"{conv}.lora_down.weight"].ndim == 4


def test_export_reads_original_weights_of_a_patched_model(setup):
    """Exporting from a model that already carries the TLoRA (loaded, patched in place) still uses W."""
    patched = stock_lora(setup.model, setup.name)
    loaded_state(patched, setup.keys)
    export(patched, setup.name, f"{SUB}/from_patched")
    export(setup.model, setup.name, f"{SUB}/from_base")
    import safetensors.torch

    a = safetensors.torch.load_file(str(setup.loras / SUB / "from_patched.safetensors"))
    b = safetensors.torch.load_file(str(setup.loras / SUB / "from_base.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_low_rank_report(setup):
    path, text = export(setup.model, setup.name, f"{SUB}/rank2", rank=2).result
    meta = core("format").read_metadata(path)
    assert meta["tlora.export_rank"] == "2" and 0 < float(meta["tlora.export_error"]) < 1
    assert "rank 2" in text


def test_clear_errors(setup):
    with pytest.raises(ValueError, match="rank"):
        export(setup.model, setup.name, f"{SUB}/bad", rank=0)
    export(setup.model, setup.name, f"{SUB}/exists", rank=2)
    with pytest.raises(ValueError, match="exists"):
        export(setup.model, setup.name, f"{SUB}/exists", rank=2, overwrite=False)
    with pytest.raises(ValueError, match="not a readable"):
        export(setup.model, f"{SUB}/not_an_adapter.safetensors", f"{SUB}/bad")
    with pytest.raises(ValueError, match="loras folder"):
        export(setup.model, setup.name, "../escape")


@pytest.mark.parametrize(
    "losses",
    [
        [1.0 / (1 + i) + 0.01 * math.sin(i) for i in range(50)],
        [],
        [0.5, float("nan"), 0.4, float("inf"), 0.3, None],
        [float("nan")] * 3,
        [0.2],
        [100.0, 1.0, 0.5, 0.01],
    ],
    ids=["normal", "empty", "nan", "all_nan", "single", "log"],
)
def test_loss_plot_image(losses):
    out = node("plot").LossPlot.execute(loss={"loss": losses}, smoothing=0.9, log_scale="auto", width=320, height=160)
    image = out.result[0]
    assert image.shape == (1, 160, 320, 3) and image.dtype == torch.float32
    assert torch.isfinite(image).all() and float(image.min()) >= 0 and float(image.max()) <= 1
    plot = core("plot")  # what each history looks like is tested in tests/test_plot.py
    expected = plot.image_tensor(plot.draw_loss(plot.losses_of({"loss": losses}), 0.9, "auto", 320, 160))
    assert torch.equal(image, expected)
