"""ComfyUI imported in-process: the host, the pack's import, and the tiny SD1.5 checkpoint."""

import asyncio
import importlib
import re
import sys

import pytest
import torch

from tools.tiny_checkpoints import UNET_PREFIX, init_weights_


def comfy_nodes():
    """ComfyUI's top-level nodes.py (an import statement would read as this repo's nodes/ package)."""
    return importlib.import_module("nodes")


def test_host_version(comfy):
    import comfyui_version

    assert comfy.version == comfyui_version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", comfy.version)


def test_pack_imported_once_as_package(comfy):
    import comfy.weight_adapter as wa

    from tools.comfyui_host import PACK_MODULE, REPO_ROOT, load_pack

    assert sys.modules[PACK_MODULE] is comfy.pack
    assert comfy.pack.__path__ == [str(REPO_ROOT)]
    before = list(wa.adapters)
    assert load_pack() is comfy.pack  # a second import registers nothing again
    assert wa.adapters == before
    assert len(set(wa.adapters)) == len(wa.adapters), "an adapter class is registered twice"


def test_pack_node_ids_are_prefixed(comfy):
    extension = asyncio.run(comfy.pack.comfy_entrypoint())
    ids = [node.GET_SCHEMA().node_id for node in asyncio.run(extension.get_node_list())]
    assert all(i.startswith("TLoRA") for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_init_rejects_unknown_tensors():
    module = torch.nn.Module()
    module.lin = torch.nn.Linear(4, 3)
    module.scale = torch.nn.Parameter(torch.empty(3))
    with pytest.raises(RuntimeError, match="scale"):
        init_weights_(module, torch.Generator().manual_seed(0))
    init_weights_(module, torch.Generator().manual_seed(0), extra={"scale": 2.0})
    assert module.scale.eq(2.0).all() and module.lin.bias.eq(0).all()
    assert 0.2 < module.lin.weight.std().item() < 0.8  # ~ 1/sqrt(4)


def test_tiny_checkpoint_layout(tiny_checkpoint):
    import comfy.model_detection
    from safetensors import safe_open

    assert tiny_checkpoint.stat().st_size < 400e6
    with safe_open(str(tiny_checkpoint), "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
        sd = {k: f.get_tensor(k) for k in keys if k.startswith(UNET_PREFIX)}
    layers = {int(k.split(".")[5]) for k in keys if k.startswith("cond_stage_model.transformer.text_model.encoder.")}
    assert layers == set(range(12))
    assert "first_stage_model.taesd_decoder.1.weight" in keys and "first_stage_model.vae_shift" in keys
    config = comfy.model_detection.detect_unet_config(sd, UNET_PREFIX)
    expected = {"model_channels": 320, "context_dim": 768, "in_channels": 4, "channel_mult": [1]}
    expected |= {"num_res_blocks": [1], "transformer_depth": [1], "use_linear_in_transformer": False}
    assert {k: config[k] for k in expected} == expected


def test_tiny_checkpoint_is_sd15(tiny_sd15):
    import comfy.supported_models
    import comfy.taesd.taesd

    assert type(tiny_sd15.model.model.model_config) is comfy.supported_models.SD15
    assert isinstance(tiny_sd15.vae.first_stage_model, comfy.taesd.taesd.TAESD)
    assert tiny_sd15.clip is not None


def test_tiny_clip_encoding_is_finite(tiny_sd15):
    (conditioning,) = comfy_nodes().CLIPTextEncode().encode(tiny_sd15.clip, "a photo of a cat")
    cond, extra = conditioning[0]
    assert cond.shape == (1, 77, 768)
    assert torch.isfinite(cond).all() and cond.abs().max() > 0
    assert torch.isfinite(extra["pooled_output"]).all()


def test_tiny_sampling_two_steps(tiny_sd15):
    import comfy.sample

    encoder = comfy_nodes().CLIPTextEncode()
    (positive,) = encoder.encode(tiny_sd15.clip, "a lighthouse")
    (negative,) = encoder.encode(tiny_sd15.clip, "")
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    samples = comfy.sample.sample(
        tiny_sd15.model, noise, 2, 7.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=0
    )
    assert samples.shape == (1, 4, 8, 8)
    assert not torch.isnan(samples).any()
    image = tiny_sd15.vae.decode(samples)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
