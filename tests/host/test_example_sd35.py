"""example_workflows/train_tlora_sd35.json through the real server's /prompt: an SD3.5 (MMDiT) model from Load
Diffusion Model, CLIP-L alone from Load CLIP (type sd3: SD3 zero-fills the CLIP-G and T5 parts), a 16-channel VAE
from Load VAE, the pack's Load Training Images and Train TLoRA (targets "attention"), and a sample generated with
the trained model. The loaders read tiny random files written here: ComfyUI's own detection must accept them.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from tlora.format import load_adapter_file
from tools.comfyui_host import REPO_ROOT

from . import families as F
from .ui import tiny_sd35_widgets, write_training_images
from .workflow import load_workflow, ui_to_api

WORKFLOW = REPO_ROOT / "example_workflows" / "train_tlora_sd35.json"
SD35 = F.FAMILIES["sd35"]
# SD3's attention projections: both streams' fused qkv and output proj, and Medium's second image attention.
ATTENTION = re.compile(r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.(qkv|proj)")


def written_once(path, write):
    """``path``, written by ``write(partial_path)`` unless it exists (renamed in place when complete, so the
    server never lists a half-written file)."""
    if not path.exists():
        write(path.with_suffix(".partial")).rename(path)
    return path


@pytest.fixture(scope="session")
def sd35_files(comfy, comfy_server) -> SimpleNamespace:
    """The workflow's three model files in the server's model folders: the tiny SD3.5 diffusion model,
    a full-size CLIP-L and a TAESD with 16 latent channels."""
    from tools.tiny_checkpoints import write_clip_l, write_taesd3

    why = F.missing_on_host(SD35)
    if why:
        pytest.skip(why)
    dirs = comfy_server.model_dirs
    return SimpleNamespace(
        unet=written_once(dirs["diffusion_models"] / "tiny_sd35.safetensors", lambda p: F.write_family(SD35, p)),
        clip=written_once(dirs["text_encoders"] / "tiny_clip_l.safetensors", lambda p: write_clip_l(p, comfy.path)),
        vae=written_once(dirs["vae"] / "tiny_taesd3.safetensors", write_taesd3),
    )


def tiny_prompt(comfy_server, files, output_name: str) -> dict:
    """The example workflow as an API prompt on the tiny files: 64 px images, 2 training and 2 sampling steps."""
    prompt = ui_to_api(load_workflow(WORKFLOW), comfy_server.object_info(refresh=True), strict=True)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    widgets = tiny_sd35_widgets(files.unet.name, files.clip.name, files.vae.name, 2, output_name)
    for node_type, values in widgets.items():
        by_type[node_type].update(values)
    return prompt


def test_example_nodes_exist_here_and_are_wired(comfy_server):
    """Every node of the workflow exists on this host (both supported ComfyUI versions), the text encoder is
    loaded as SD3's, Train TLoRA reads the captions as text through the CLIP, and the sampler gets its MODEL."""
    workflow = load_workflow(WORKFLOW)
    known = comfy_server.object_info()
    assert {n["type"] for n in workflow["nodes"]} - {"Note"} <= set(known)
    prompt = ui_to_api(workflow, known, strict=True)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["CLIPLoader"]["type"] == "sd3" and by_type["TLoRATrain"]["targets"] == "attention"
    node_id = {node["class_type"]: k for k, node in prompt.items()}
    assert by_type["TLoRATrain"]["captions"] == [node_id["TLoRALoadTrainingImages"], 1]
    assert "positive" not in by_type["TLoRATrain"]
    assert by_type["KSampler"]["model"] == [node_id["TLoRATrain"], 0]  # the sample uses the trained model


def test_sd35_example_trains_and_samples(comfy_server, sd35_files):
    write_training_images(comfy_server.input_dir / "my_subject")
    history = comfy_server.run(tiny_prompt(comfy_server, sd35_files, "sd35_example_run"), timeout=900)

    adapter = load_adapter_file(comfy_server.loras_dir / "sd35_example_run.safetensors")
    assert adapter.metadata["tlora.base_model"] == "SD3"
    assert adapter.metadata["tlora.method"] == "tlora" and adapter.metadata["tlora.steps"] == "2"

    import safetensors.torch

    layers = {k.removesuffix(".weight") for k in safetensors.torch.load_file(sd35_files.unet)}
    expected = {name for name in layers if ATTENTION.fullmatch(name)}
    # depth 2: x_block attn qkv/proj in both blocks, attn2 in block 0, context qkv in both, proj in block 0 only
    # (the last context block is pre-only).
    assert len(expected) == 9
    assert set(adapter.modules) == {f"diffusion_model.{name}" for name in expected}
    for name, group in adapter.modules.items():
        assert all(torch.isfinite(t).all() for t in group.values()), name
        assert group["tlora.residual_out.0"].abs().max() > 0, f"{name}: the residual (zero at init) did not move"

    images = [f for f in comfy_server.output_files(history) if f.name.startswith("tlora_sd35_sample")]
    assert len(images) == 1 and images[0].is_file()
    from PIL import Image

    with Image.open(images[0]) as image:
        assert image.size == (64, 64)
