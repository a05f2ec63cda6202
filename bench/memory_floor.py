"""Device memory a training run needs per family at its released size, by the trainer's own estimate
(tlora/memory.py): with every weight on the device (bf16, fp8) and with every weight offloaded (the floor).

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/python bench/memory_floor.py

Released sizes are built on the meta device through ComfyUI's own classes and detection (no memory), the
layer set is each family's default (``attention``), the method TLoRA(2,6), batch 1 at the family's usual
resolution. Activations: ComfyUI's inference estimate as it stands with PyTorch's flash attention (a GPU:
``area · dtype size · 0.01 · memory_usage_factor`` MiB, area over the latent's non-channel axes), times
:data:`tlora.memory.ACTIVATION_FACTOR`. Prints the markdown table of docs/families.md.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# (family key, released size, latent of one sample at the usual resolution (C, [T,] H, W), resolution)
ROWS = [
    ("sd15", "SD1.5", (4, 64, 64), "512²"),
    ("sdxl", "SDXL", (4, 128, 128), "1024²"),
    ("sd35", "SD3.5 Large", (16, 128, 128), "1024²"),
    ("flux1", "Flux.1 [dev]", (16, 128, 128), "1024²"),
    ("qwen_image", "Qwen-Image", (16, 1, 128, 128), "1024²"),
    ("zimage", "Z-Image", (16, 128, 128), "1024²"),
    ("wan21", "Wan 2.1 14B", (16, 21, 60, 104), "832×480, 81 frames"),
    ("wan22", "Wan 2.2 TI2V-5B", (48, 31, 44, 80), "1280×704, 121 frames"),
]
SD15_FULL = {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}


def unet_family(key: str, title: str, config: dict):
    """SD1.5 and SDXL as ``families.Family`` entries (only their full size is built here)."""
    from host import families as F

    sd21 = F.FAMILIES["sd21"]
    fields = {**sd21.__dict__, "key": key, "title": title, "config_class": key.upper(), "full": {title: config}}
    return F.Family(**fields)


def families():
    from host import families as F

    from tools.tiny_checkpoints import SDXL_UNET_CONFIG, UNET_CONFIG

    found = dict(F.FAMILIES)
    found["sd15"] = unet_family("sd15", "SD1.5", {**UNET_CONFIG, **SD15_FULL})
    found["sdxl"] = unet_family("sdxl", "SDXL", SDXL_UNET_CONFIG)
    return found


def row(family, size: str, latent: tuple[int, ...]) -> dict | None:
    from host import families as F

    from tlora.memory import estimate
    from tlora.model import select_modules

    if F.missing_on_host(family):
        return None
    config = family.full[size]
    model_config = F.detect(family, config)
    model = F.meta_model(family, config)
    architecture = [cls.__name__ for cls in type(model_config).__mro__]
    layers = select_modules(model, ["attention"], architecture=architecture)
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    area = math.prod(latent[1:])
    inference = area * 2 * 0.01 * model_config.memory_usage_factor * 2**20
    options = {"transform_rank": 2, "residual_rank": 6, "regularizer": "none", "regularizer_weight": 0.0}
    shapes = [tuple(m.weight.shape) for m in layers.values()]
    kwargs = {"weights": 2 * params, "largest_layer": 4 * largest, "inference_activations": inference}
    plain = estimate("tlora", shapes, options, gradient_checkpointing=False, **kwargs)
    checkpointed = estimate("tlora", shapes, options, gradient_checkpointing=True, **kwargs)
    return {
        "params": params,
        "layers": len(layers),
        "full_bf16": checkpointed.full,
        "full_fp8": checkpointed.full - params,
        "floor": checkpointed.floor,
        "floor_plain": plain.floor,
    }


def main() -> None:
    from tools import comfyui_host

    path, why = comfyui_host.find_comfyui()
    if path is None:
        raise SystemExit(why)
    version = comfyui_host.import_host(path)
    found = families()
    print(f"ComfyUI {version}; TLoRA(2,6) on `attention`, batch 1, gradient checkpointing unless noted\n")
    print(
        "| family | resolution | parameters | all weights on the GPU, bf16 / fp8 | floor (offloaded) "
        "| floor without checkpointing |"
    )
    print("|---|---|---|---|---|---|")
    gb = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    for key, size, latent, resolution in ROWS:
        r = row(found[key], size, latent)
        if r is None:
            print(f"| {size} | {resolution} | not in this ComfyUI | | | |")
            continue
        print(
            f"| {size} | {resolution} | {r['params'] / 1e9:.2f}B | {gb(r['full_bf16'])} / {gb(r['full_fp8'])} "
            f"| {gb(r['floor'])} | {gb(r['floor_plain'])} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
