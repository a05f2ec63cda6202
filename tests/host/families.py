"""Tiny random checkpoints of the model families people train today, recognized by ComfyUI's own detection.

One ``Family`` each: SD2.1 (768-v), SD3.5, Flux.1 [dev], Qwen-Image, Z-Image, Wan 2.1 and Wan 2.2 (TI2V-5B).
A tiny checkpoint is made in three steps, each through ComfyUI's own code:

1. the family's diffusion model class is built on the meta device at ``tiny`` (keys and shapes, no memory);
2. ``comfy.model_detection.model_config_from_unet`` reads those keys and shapes and returns the model config
   ComfyUI will load the file as (it must be ``config_class``), with the widths it derives from them;
3. that config's model is built on CPU (``model_config.get_model``), every tensor initialized here, and its
   diffusion model's state dict written as safetensors (SD2.1: a full checkpoint, UNet and a TAESD VAE).

Step 3 builds what detection says, not what ``tiny`` asked for: where a host fixes a width whatever the file
holds (Z-Image is always 3840 wide, Qwen-Image 3072, Flux on ComfyUI 0.3.64 3072), the checkpoint is as small
as detection allows (one block of each kind), not tiny. ``full`` holds the released sizes, built on the meta
device only, to read real layer shapes from.

No text encoder is written: tests feed ``conditioning()``, random tensors of the widths the family's encoders
produce. Only call these functions once the ``comfy`` fixture has put the host on ``sys.path``.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tlora import targets
from tools.tiny_checkpoints import UNET_PREFIX, VAE_PREFIX

Init = Callable[[torch.Tensor, torch.Generator], None]


def normal(std: float) -> Init:
    """Draw from N(0, std²)."""
    return lambda t, g: t.normal_(0.0, std, generator=g)


def normal_last_dim(t: torch.Tensor, g: torch.Generator) -> None:
    """Draw from N(0, 1/d), d = last dimension (Wan's modulation tables, as Wan itself does)."""
    t.normal_(0.0, t.shape[-1] ** -0.5, generator=g)


def fill(value: float) -> Init:
    return lambda t, g: t.fill_(value)


@dataclass(frozen=True)
class Family:
    """One model family: how to build its tiny checkpoint and what ComfyUI must make of it."""

    key: str
    title: str
    diffusion_model: str  # ComfyUI's class, dotted
    config_class: str  # comfy.supported_models class that detection must return
    model_class: str  # comfy.model_base class of the loaded model
    model_type: str  # comfy.model_base.ModelType name
    prediction: str  # what the network predicts: "eps", "v" or "flow" (velocity of the noise→image path)
    latent: tuple[int, ...]  # one sample's latent in tests: (C, H, W) or (C, T, H, W)
    context: tuple[int, int]  # (tokens in tests, width) of the text conditioning
    text_encoder: str  # what produces that conditioning in a real workflow
    tiny: dict
    full: dict[str, dict]  # released sizes by name, for the layer shapes
    outside_blocks: tuple[str, ...]  # globs of the Linear layers no group holds: embedders, final layer
    pooled: int | None = None  # width of the pooled_output the model needs
    cond_extras: dict = field(default_factory=dict)  # other conditioning entries
    init: dict[str, Init] = field(default_factory=dict)  # state-dict name glob -> init, applied first
    host_config: Callable[[dict], dict] | None = None  # adapts a config to this host's class signature
    checkpoint: bool = False  # full checkpoint (load_checkpoint_guess_config) instead of a diffusion model
    dtype: torch.dtype = torch.bfloat16  # of the written file


def _flux_config(config: dict) -> dict:
    """0.33's FluxParams declares ``txt_ids_dims`` without a default; 0.3.64's has no such field."""
    import comfy.ldm.flux.model

    if "txt_ids_dims" in comfy.ldm.flux.model.FluxParams.__dataclass_fields__:
        return {"txt_ids_dims": [], **config}
    return config


_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "context_dim": 1024,
    "num_heads": -1,
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


_SD35 = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "input_size": None,
    "adm_in_channels": 2048,
    "pos_embed_scaling_factor": None,
    "qk_norm": "rms",
}


def _mmdit(depth: int, pos_embed_max_size: int, x_block_self_attn_layers: list[int]) -> dict:
    """MMDiT width is 64·depth with ``depth`` heads and ``depth`` joint blocks (ComfyUI derives all three)."""
    return {
        **_SD35,
        "depth": depth,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": 4096, "out_features": 64 * depth},
        },
        "num_patches": pos_embed_max_size**2,
        "pos_embed_max_size": pos_embed_max_size,
        "x_block_self_attn_layers": x_block_self_attn_layers,
    }


_FLUX = {
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "mlp_ratio": 4.0,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}

_ZIMAGE = {
    "patch_size": 2,
    "in_channels": 16,
    "dim": 3840,
    "n_heads": 30,
    "n_kv_heads": 30,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0,
    "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": True,
    "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}

_WAN = {
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "freq_dim": 256,
    "text_dim": 4096,
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}


def _wan(dim: int, ffn_dim: int, num_layers: int, channels: int) -> dict:
    """Wan's heads are 128 wide: ComfyUI derives ``num_heads = dim // 128``."""
    return {**_WAN, "dim": dim, "ffn_dim": ffn_dim, "num_heads": dim // 128, "num_layers": num_layers,
            "in_dim": channels, "out_dim": channels}  # fmt: skip


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in [
        Family(
            key="sd21",
            title="Stable Diffusion 2.1 (768-v)",
            diffusion_model="comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",
            config_class="SD20",
            model_class="BaseModel",
            model_type="V_PREDICTION",
            prediction="v",
            latent=(4, 8, 8),
            context=(77, 1024),
            text_encoder="OpenCLIP ViT-H/14, penultimate layer [B, 77, 1024]",
            # SD2's 12 output blocks (4 levels x 3) at one width: ComfyUI tells v from eps by output block 11's
            # first transformer; attention on the first level and in the middle only. (transformer_depth_output
            # runs from the last output block to the first, as ComfyUI's UNetModel pops it.)
            tiny={
                **_UNET,
                "num_res_blocks": [2, 2, 2, 2],
                "channel_mult": [1, 1, 1, 1],
                "transformer_depth": [1, 1, 0, 0, 0, 0, 0, 0],
                "transformer_depth_output": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                "transformer_depth_middle": 1,
            },
            full={
                "SD2.1 768-v": {
                    **_UNET,
                    "num_res_blocks": [2, 2, 2, 2],
                    "channel_mult": [1, 2, 4, 4],
                    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                    "transformer_depth_middle": 1,
                }
            },
            outside_blocks=("time_embed.*",),
            # ComfyUI's SD20.model_type: v-prediction when this bias spreads (std > 0.09), as trained 768-v
            # weights do; a freshly initialized norm (bias 0) would read as eps.
            init={"output_blocks.11.1.transformer_blocks.0.norm1.bias": normal(0.2)},
            checkpoint=True,
            dtype=torch.float16,
        ),
        Family(
            key="sd35",
            title="Stable Diffusion 3.5 (MMDiT)",
            diffusion_model="comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",
            config_class="SD3",
            model_class="SD3",
            model_type="FLOW",
            prediction="flow",
            latent=(16, 8, 8),
            context=(16, 4096),
            pooled=2048,
            text_encoder="CLIP-L + CLIP-G (zero-padded to 4096) and T5-XXL tokens [B, 77+T, 4096]; "
            "pooled CLIP-L ⊕ CLIP-G [B, 2048]",
            # Medium's layout (qk RMS norm, a second image self-attention in block 0) at depth 2: 128 wide.
            tiny=_mmdit(depth=2, pos_embed_max_size=16, x_block_self_attn_layers=[0]),
            full={
                "SD3.5 Large": _mmdit(depth=38, pos_embed_max_size=192, x_block_self_attn_layers=[]),
                "SD3.5 Medium": _mmdit(depth=24, pos_embed_max_size=384, x_block_self_attn_layers=list(range(13))),
            },
            outside_blocks=("t_embedder.*", "y_embedder.*", "context_embedder", "final_layer.*"),
            init={"pos_embed": normal(0.02)},
            dtype=torch.float16,
        ),
        Family(
            key="flux1",
            title="Flux.1 [dev]",
            diffusion_model="comfy.ldm.flux.model.Flux",
            config_class="Flux",
            model_class="Flux",
            model_type="FLUX",
            prediction="flow",
            latent=(16, 8, 8),
            context=(16, 4096),
            pooled=768,
            cond_extras={"guidance": 3.5},
            text_encoder="T5-XXL [B, T, 4096]; pooled CLIP-L [B, 768]; guidance (distilled CFG) scalar",
            tiny={**_FLUX, "hidden_size": 128, "num_heads": 1, "depth": 1, "depth_single_blocks": 1},
            full={
                "Flux.1 [dev]": {**_FLUX, "hidden_size": 3072, "num_heads": 24, "depth": 19, "depth_single_blocks": 38}
            },
            # Single blocks have no separate attention projections: linear1 is [q k v mlp_in] (3·D + 4·D outputs),
            # linear2 is [attention out | mlp out] (D + 4·D inputs); "attention" takes them whole.
            outside_blocks=("img_in", "time_in.*", "vector_in.*", "guidance_in.*", "txt_in", "final_layer.*"),
            host_config=_flux_config,
        ),
        Family(
            key="qwen_image",
            title="Qwen-Image",
            diffusion_model="comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",
            config_class="QwenImage",
            model_class="QwenImage",
            model_type="FLUX",
            prediction="flow",
            latent=(16, 1, 8, 8),
            context=(16, 3584),
            text_encoder="Qwen2.5-VL-7B hidden states [B, T, 3584]",
            tiny={"in_channels": 64, "out_channels": 16, "num_layers": 1},
            full={"Qwen-Image": {"in_channels": 64, "out_channels": 16, "num_layers": 60}},
            outside_blocks=("time_text_embed.*", "img_in", "txt_in", "norm_out.linear", "proj_out"),
        ),
        Family(
            key="zimage",
            title="Z-Image (ComfyUI: Lumina 2 / NextDiT)",
            diffusion_model="comfy.ldm.lumina.model.NextDiT",
            config_class="ZImage",
            model_class="Lumina2",
            model_type="FLOW",
            prediction="flow",
            latent=(16, 8, 8),
            context=(16, 2560),
            text_encoder="Qwen3-4B hidden states [B, T, 2560]",
            tiny={**_ZIMAGE, "n_layers": 1},
            full={"Z-Image": {**_ZIMAGE, "n_layers": 30}},
            # noise_refiner blocks see image tokens only, context_refiner blocks text tokens only (no timestep),
            # layers both; "attention" is every block's.
            outside_blocks=("x_embedder", "t_embedder.*", "cap_embedder.1", "final_layer.*"),
            init={"*_pad_token": normal(0.02)},
        ),
        Family(
            key="wan21",
            title="Wan 2.1 (text to video; Wan 2.2 A14B has the same layout)",
            diffusion_model="comfy.ldm.wan.model.WanModel",
            config_class="WAN21_T2V",
            model_class="WAN21",
            model_type="FLOW",
            prediction="flow",
            latent=(16, 2, 8, 8),
            context=(16, 4096),
            text_encoder="umT5-XXL [B, 512, 4096]",
            tiny=_wan(dim=128, ffn_dim=256, num_layers=1, channels=16),
            full={
                "Wan 2.1 14B": _wan(dim=5120, ffn_dim=13824, num_layers=40, channels=16),
                "Wan 2.1 1.3B": _wan(dim=1536, ffn_dim=8960, num_layers=30, channels=16),
            },
            outside_blocks=("text_embedding.*", "time_embedding.*", "time_projection.1", "head.head"),
            init={"*modulation": normal_last_dim},
        ),
        Family(
            key="wan22",
            title="Wan 2.2 TI2V-5B",
            diffusion_model="comfy.ldm.wan.model.WanModel",
            config_class="WAN22_T2V",
            model_class="WAN22",
            model_type="FLOW",
            prediction="flow",
            latent=(48, 2, 8, 8),
            context=(16, 4096),
            text_encoder="umT5-XXL [B, 512, 4096]",
            tiny=_wan(dim=128, ffn_dim=256, num_layers=1, channels=48),
            full={"Wan 2.2 TI2V-5B": _wan(dim=3072, ffn_dim=14336, num_layers=30, channels=48)},
            outside_blocks=("text_embedding.*", "time_embedding.*", "time_projection.1", "head.head"),
            init={"*modulation": normal_last_dim},
        ),
    ]
}


def missing_on_host(family: Family) -> str | None:
    """Why this host cannot load ``family`` (it has no such model config), or None."""
    import comfy.supported_models
    import comfyui_version

    if not hasattr(comfy.supported_models, family.config_class):
        return f"ComfyUI {comfyui_version.__version__} has no {family.config_class} model config"
    return None


def _norm_types() -> tuple[type, ...]:
    """Norm layers of these models by type: torch's, and ComfyUI's own RMSNorm classes where a host has them."""
    import comfy.ldm.flux.layers
    import comfy.ldm.modules.diffusionmodules.mmdit

    own = (getattr(m, "RMSNorm", None) for m in (comfy.ldm.flux.layers, comfy.ldm.modules.diffusionmodules.mmdit))
    torch_norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
    return torch_norms + tuple(t for t in own if isinstance(t, type))


def init_tensors_(module: torch.nn.Module, generator: torch.Generator, rules: dict[str, Init] | None = None) -> None:
    """Initialize every tensor of ``module``'s state dict in place.

    ``rules`` (state-dict name glob -> init) first; then by layer type: Linear/Conv weights ~ N(0, 1/fan_in)
    with fan_in = in_features or in_channels/groups·prod(kernel), biases 0; norm weights 1, biases 0;
    embeddings N(0, 0.02²). A tensor left over raises, so none keeps uninitialized memory.
    """
    tensors = module.state_dict(keep_vars=True)
    done: set[int] = set()
    norms = _norm_types()
    with torch.no_grad():
        for pattern, init in (rules or {}).items():
            names = [n for n in tensors if fnmatch.fnmatchcase(n, pattern)]
            if not names:
                raise RuntimeError(f"tiny checkpoint: init rule {pattern!r} matches no tensor")
            for name in names:
                init(tensors[name], generator)
                done.add(id(tensors[name]))
        for m in module.modules():
            own = [t for _, t in m.named_parameters(recurse=False) if id(t) not in done]
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                if id(m.weight) not in done:
                    m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=generator)
                if m.bias is not None and id(m.bias) not in done:
                    m.bias.zero_()
            elif isinstance(m, norms):
                for name, t in m.named_parameters(recurse=False):
                    if id(t) not in done:
                        t.fill_(0.0 if name == "bias" else 1.0)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0.0, 0.02, generator=generator)
            else:
                continue
            done.update(id(t) for t in own)
    left = [f"{n} {tuple(t.shape)}" for n, t in tensors.items() if id(t) not in done]
    if left:
        raise RuntimeError(f"tiny checkpoint: no init rule for {left}")


def _diffusion_class(family: Family) -> type:
    module, name = family.diffusion_model.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def meta_model(family: Family, config: dict) -> torch.nn.Module:
    """ComfyUI's diffusion model of ``family`` at ``config`` on the meta device (shapes, no storage)."""
    import comfy.ops

    if family.host_config is not None:
        config = family.host_config(config)
    return _diffusion_class(family)(**config, device="meta", operations=comfy.ops.disable_weight_init)


def detect(family: Family, config: dict):
    """The model config ComfyUI's detection returns for ``family`` at ``config``; raises unless it is the family's."""
    import comfy.model_detection

    state_dict = meta_model(family, config).state_dict()
    model_config = comfy.model_detection.model_config_from_unet(state_dict, "")
    name = type(model_config).__name__ if model_config is not None else None
    if name != family.config_class:
        detected = comfy.model_detection.detect_unet_config(state_dict, "")
        raise RuntimeError(f"{family.key}: ComfyUI detects {name}, not {family.config_class}, from {detected}")
    return model_config


def build_diffusion_model(family: Family, seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of the model ComfyUI detects from ``family.tiny``, built by ComfyUI and initialized here."""
    model_config = detect(family, family.tiny)
    model_config.set_inference_dtype(family.dtype, None)
    model = model_config.get_model({}, "", device="cpu")
    init_tensors_(model.diffusion_model, torch.Generator().manual_seed(seed), family.init)
    return {k: v.detach().contiguous() for k, v in model.diffusion_model.state_dict().items()}


def _taesd_state_dict(generator: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD()
    init_tensors_(vae, generator, {"vae_scale": fill(1.0), "vae_shift": fill(0.0)})
    return {k: v.detach().to(dtype) for k, v in vae.state_dict().items()}


def write_family(family: Family, path: str | Path, seed: int = 0) -> Path:
    """Write ``family``'s tiny checkpoint to ``path`` (safetensors) and return it.

    SD2.1: a full checkpoint, UNet under ``model.diffusion_model.`` and a TAESD VAE (no text encoder);
    the others: the bare diffusion model, as ComfyUI's "Load Diffusion Model" reads it.
    """
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = build_diffusion_model(family, seed)
    if family.checkpoint:
        state_dict = {UNET_PREFIX + k: v for k, v in state_dict.items()}
        taesd = _taesd_state_dict(torch.Generator().manual_seed(seed + 1), family.dtype)
        state_dict.update({VAE_PREFIX + k: v for k, v in taesd.items()})
    metadata = {"comment": f"comfyui-tlora test checkpoint ({family.title}), random weights"}
    safetensors.torch.save_file(state_dict, str(path), metadata=metadata)
    return path


def load_family(family: Family, path: str | Path):
    """Load a written checkpoint the way ComfyUI's loader nodes do; returns the ModelPatcher."""
    import comfy.sd

    if family.checkpoint:
        return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    return comfy.sd.load_diffusion_model(str(path))


def conditioning(family: Family, batch: int = 1, seed: int = 0) -> list:
    """ComfyUI conditioning ``[[context, extras]]`` of random N(0, 1) tensors at the family's widths."""
    g = torch.Generator().manual_seed(seed)
    tokens, width = family.context
    extras = dict(family.cond_extras)
    if family.pooled is not None:
        extras["pooled_output"] = torch.randn(batch, family.pooled, generator=g)
    return [[torch.randn(batch, tokens, width, generator=g), extras]]


def linear_layers(module: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """Linear layers of ``module`` by name pattern: (out_features, in_features, count).

    Block indices become ``*`` (an index into a ModuleList whose children share one type: the block lists);
    indices into mixed containers (``ff.net.0``, ``to_out.0``, ``img_mlp.2``) stay. A pattern whose layers
    differ in shape (the UNet's levels) gets one entry per shape, the later ones suffixed ``[out x in]``.
    """
    block_lists = {
        name for name, m in module.named_modules() if type(m) is torch.nn.ModuleList and len({type(c) for c in m}) == 1
    }
    out: dict[str, tuple[int, int, int]] = {}
    for name, m in module.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        parts = name.split(".")
        pattern = ".".join(
            "*" if part.isdigit() and ".".join(parts[:i]) in block_lists else part for i, part in enumerate(parts)
        )
        shape = (m.out_features, m.in_features)
        if pattern in out and out[pattern][:2] != shape:
            pattern = f"{pattern} [{shape[0]}x{shape[1]}]"
        out[pattern] = (*shape, out.get(pattern, (0, 0, 0))[2] + 1)
    return out


def groups_of(family: Family) -> dict[str, tuple[str, ...]]:
    """The family's layer groups: the core's preset for its architecture (tlora/targets.py), found
    through ComfyUI's config class and its parents, as the trainer finds it."""
    config = getattr(importlib.import_module("comfy.supported_models"), family.config_class)
    return targets.PRESETS[targets.preset_of([cls.__name__ for cls in config.__mro__])]


def group_of(family: Family, name: str) -> list[str]:
    """The groups of ``family`` whose globs match the Linear layer ``name`` (relative to the diffusion model)."""
    return [g for g, globs in groups_of(family).items() if targets.matches(name, globs)]
