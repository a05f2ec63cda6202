"""A tiny SD1.5-layout checkpoint, and standalone CLIP-L and TAESD3 files, built from ComfyUI's own module classes.

ComfyUI's layers (``comfy.ops.disable_weight_init``) skip weight init, so every tensor is
initialized here explicitly and deterministically. Only import this module's functions after
the ``comfy`` fixture has put the host on ``sys.path``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# The UNet: SD15's detected config (context_dim 768, model_channels 320, conv proj_in) at the smallest
# depth: one level, one ResBlock, one transformer block per spatial transformer.
UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."


def init_weights_(module: torch.nn.Module, generator: torch.Generator, extra: dict | None = None) -> None:
    """Initialize every parameter and floating buffer of ``module`` in place.

    Linear/conv weights ~ N(0, 1/fan_in) with fan_in = in_features or in_channels/groups * prod(kernel);
    biases 0; norm weights 1, biases 0; embeddings N(0, 0.02²). ``extra`` maps the names of any other
    parameters to a fill value. Anything left over raises, so no tensor keeps uninitialized memory.
    """
    extra = dict(extra or {})
    done: set[int] = set()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
                done.add(id(m.weight))
                if m.bias is not None:
                    m.bias.zero_()
                    done.add(id(m.bias))
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    done.add(id(m.weight))
                if m.bias is not None:
                    m.bias.zero_()
                    done.add(id(m.bias))
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0.0, 0.02, generator=generator)
                done.add(id(m.weight))
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if id(t) in done:
                continue
            if name in extra:
                t.fill_(extra.pop(name))
                done.add(id(t))
            else:
                raise RuntimeError(f"tiny checkpoint: no init rule for tensor {name!r} {tuple(t.shape)}")
    if extra:
        raise RuntimeError(f"tiny checkpoint: unknown extra init names {sorted(extra)}")


def _prefixed(module: torch.nn.Module, prefix: str, dtype: torch.dtype, skip: tuple = ()) -> dict[str, torch.Tensor]:
    return {
        prefix + k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in module.state_dict().items()
        if not k.startswith(skip)
    }


def clip_l(comfy_path: str | Path, generator: torch.Generator) -> torch.nn.Module:
    """ComfyUI's full-size CLIP-L text model (SD1.5's text encoder, SD3's and Flux's clip_l), initialized."""
    import comfy.clip_model
    import comfy.ops

    config = json.loads((Path(comfy_path) / "comfy" / "sd1_clip_config.json").read_text())
    clip = comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    init_weights_(clip, generator)
    return clip


def taesd(generator: torch.Generator, latent_channels: int = 4, scale: float = 1.0, shift: float = 0.0):
    """ComfyUI's TAESD (encoder + decoder) with ``latent_channels``, initialized; ``scale`` and
    ``shift`` map its latents to the model's (``vae_scale``, ``vae_shift``)."""
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    init_weights_(vae, generator, extra={"vae_scale": scale, "vae_shift": shift})
    return vae


def build_state_dict(comfy_path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict:
    """State dict of the tiny checkpoint: UNet (SD15 layout), full CLIP-L, TAESD as the VAE."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    unet = UNetModel(**UNET_CONFIG, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    init_weights_(unet, gen)
    sd.update(_prefixed(unet, UNET_PREFIX, dtype))
    del unet

    # SD1.5 checkpoints carry no text_projection (HF CLIPTextModel has none; ComfyUI would misplace it).
    sd.update(_prefixed(clip_l(comfy_path, gen), CLIP_PREFIX, dtype, skip=("text_projection",)))
    sd.update(_prefixed(taesd(gen), VAE_PREFIX, dtype))
    return sd


def _save(state_dict: dict[str, torch.Tensor], path: str | Path, what: str) -> Path:
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"comment": f"comfyui-tlora test {what}, random weights"}
    safetensors.torch.save_file(state_dict, str(path), metadata=metadata)
    return path


def write_tiny_sd15(path: str | Path, comfy_path: str | Path, seed: int = 0) -> Path:
    """Write the tiny SD1.5 checkpoint (fp16 safetensors, ~300 MB) to ``path`` and return it."""
    return _save(build_state_dict(comfy_path, seed=seed), path, "checkpoint")


def write_clip_l(path: str | Path, comfy_path: str | Path, seed: int = 0) -> Path:
    """A standalone clip_l text encoder file (``text_model.*``, ``text_projection.weight``; fp16, ~250 MB),
    what Load CLIP reads as CLIP-L."""
    clip = clip_l(comfy_path, torch.Generator().manual_seed(seed))
    return _save(_prefixed(clip, "", torch.float16), path, "CLIP-L text encoder")


def write_taesd3(path: str | Path, seed: int = 0) -> Path:
    """A VAE file that Load VAE detects as a TAESD with SD3's 16 latent channels (``taesd_encoder.*``,
    ``taesd_decoder.*``), with the latent scale and shift ComfyUI gives its ``taesd3`` (1.5305, 0.0609)."""
    vae = taesd(torch.Generator().manual_seed(seed), latent_channels=16, scale=1.5305, shift=0.0609)
    return _save(_prefixed(vae, "", torch.float16), path, "TAESD3 VAE")


# A full-size SDXL UNet (what ComfyUI detects as SDXL: context_dim 2048, ADM 2816, linear proj).
SDXL_UNET_CONFIG = {
    **UNET_CONFIG,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
    "context_dim": 2048,
    "num_heads": -1,
    "num_head_channels": 64,
    "use_linear_in_transformer": True,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
}


def build_sdxl_unet(device: str, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """State dict of a randomly initialized full-size SDXL UNet (2.6B parameters), built on
    ``device`` (benchmarks on a GPU; ~5 GB in fp16)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**SDXL_UNET_CONFIG, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    init_weights_(unet, torch.Generator(device).manual_seed(seed))
    return unet.state_dict()


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest float8_e4m3fn


def scaled_fp8(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state_dict`` as a "scaled fp8" checkpoint of the kind both tested ComfyUI versions read
    (``<prefix>scaled_fp8`` marks it): every 2-D weight under ``prefix`` (the Linear layers)
    stored in float8_e4m3fn as ``w / s`` with a per-tensor ``.scale_weight`` ``s = max|w| / 448``
    (and ``.scale_input`` 1: inputs unscaled); everything else unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith(".weight") and value.ndim == 2:
            scale = value.float().abs().max().clamp(min=1e-12) / FP8_MAX
            out[key] = (value.float() / scale).to(FP8)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            out[key[: -len("weight")] + "scale_input"] = torch.ones(())
        else:
            out[key] = value
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out
