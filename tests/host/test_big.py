"""Big models on small devices, against a real ComfyUI: fp8 and scaled-fp8 base weights train in bypass mode
and the file applies to the fp8 model and to its bf16 original alike.

fp8 models are made two ways: a file loaded with ``model_options={"dtype": float8_e4m3fn}`` (ComfyUI's
"weight_dtype: fp8_e4m3fn"), and a "scaled fp8" copy of the file (``tools.tiny_checkpoints.scaled_fp8``, the
format of the released fp8_scaled checkpoints: 0.3.64 loads it with its scaled-fp8 layers, 0.33 as quantized
tensors in layers that are not ``nn.Linear``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from . import families as F
from .checks import denoised, relative_error

FP8 = torch.float8_e4m3fn
FP8_KINDS = ("fp8", "scaled_fp8")
# Two adapters' effects on the output agree to this on the fp8 and the bf16 model (measured: 0.04 to 0.08;
# fp8 keeps 3 mantissa bits, a relative rounding of up to 6 % per weight).
FP8_TOLERANCE = 0.15


def pack(name: str):
    return importlib.import_module(f"comfyui_tlora.{name}")


class Source:
    """One family's tiny model as bf16 and as fp8 (both kinds), with its conditioning and latent shape."""

    def __init__(self, key: str, path: Path, scaled: Path, positive: list, latent: tuple, checkpoint: bool):
        self.key, self.path, self.scaled, self.positive, self.latent = key, path, scaled, positive, latent
        self.checkpoint = checkpoint

    def load(self, kind: str):
        import comfy.sd

        path = self.scaled if kind == "scaled_fp8" else self.path
        options = {} if kind == "scaled_fp8" else {"dtype": FP8 if kind == "fp8" else torch.bfloat16}
        if self.checkpoint:
            return comfy.sd.load_checkpoint_guess_config(
                str(path), output_vae=False, output_clip=False, model_options=options
            )[0]
        return comfy.sd.load_diffusion_model(str(path), model_options=options)


def scaled_copy(path: Path, prefix: str) -> Path:
    import safetensors.torch

    from tools.tiny_checkpoints import scaled_fp8

    out = path.with_name(f"{path.stem}_scaled_fp8.safetensors")
    if not out.exists():
        safetensors.torch.save_file(scaled_fp8(safetensors.torch.load_file(str(path)), prefix), str(out))
    return out


@pytest.fixture(scope="module", params=["sd15", "wan21"])
def source(request, comfy, tiny_checkpoint, tiny_sd15) -> Source:
    """SD1.5 (a UNet, convolutions included) and Wan 2.1 (a DiT, video latents)."""
    from tools.tiny_checkpoints import UNET_PREFIX

    if request.param == "sd15":
        (positive,) = importlib.import_module("nodes").CLIPTextEncode().encode(tiny_sd15.clip, "a photo of sks toy")
        scaled = scaled_copy(tiny_checkpoint, UNET_PREFIX)
        return Source("sd15", tiny_checkpoint, scaled, positive, (4, 8, 8), checkpoint=True)
    family = F.FAMILIES["wan21"]
    path = comfy.dirs.checkpoints.parent / "diffusion_models" / "big_wan21.safetensors"
    if not path.exists():
        F.write_family(family, path.with_suffix(".partial")).rename(path)
    return Source("wan21", path, scaled_copy(path, ""), F.conditioning(family), family.latent, checkpoint=False)


@pytest.mark.parametrize("kind", FP8_KINDS)
def test_fp8_base_trains_in_bypass_and_the_file_applies_to_bf16_alike(source, kind, comfy):
    fp8 = source.load(kind)
    architecture = pack("nodes.apply").architecture_names(fp8)
    layers = pack("tlora.model").select_modules(fp8.model.diffusion_model, ["attention"], architecture=architecture)
    is_plain = pack("tlora.model").is_plain_weight
    assert layers and not any(is_plain(m.weight) for m in layers.values()), "the fp8 model's layers are fp8"
    before = {k: v.clone() for k, v in fp8.model.diffusion_model.state_dict().items() if "attn" in k}

    gen = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(2, *source.latent, generator=gen)}
    options = pack("tlora.options").TrainingOptions(method="tlora", steps=4, learning_rate=1e-2, seed=0)
    name = f"big/{source.key}_{kind}.safetensors"
    output = comfy.dirs.loras / name
    output.unlink(missing_ok=True)
    result = pack("nodes.train").train(fp8, latents, options, positive=source.positive, output=output)
    assert len(result.losses) == 4 and all(map(torch.isfinite, torch.tensor(result.losses)))
    after = fp8.model.diffusion_model.state_dict()
    assert all(
        torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items() if v.dtype == FP8
    )

    bf16 = source.load("bf16")
    # The first step's loss is the base model's (adapters start at the identity): the fp8 layers computed as
    # their own forward does (upcast, scaled), not with the raw fp8 numbers.
    reference = pack("nodes.train").train(bf16, latents, options.replace(steps=1), positive=source.positive)
    assert result.losses[0] == pytest.approx(reference.losses[0], rel=0.05)

    x0, noise = torch.randn(1, *source.latent, generator=gen), torch.randn(1, *source.latent, generator=gen)
    apply = pack("nodes.apply").ApplyTLoRA.execute
    effects = {}
    for label, model in (("fp8", fp8), ("bf16", bf16)):
        sigma = float(model.model.model_sampling.percent_to_sigma(0.5))
        base = denoised(model, source.positive, x0, sigma, noise)
        adapted = denoised(apply(model, name, 1.0, 0.0).args[0], source.positive, x0, sigma, noise)
        effects[label] = adapted - base
        # TLoRA starts at the identity: a change of the output is the parameters having moved.
        assert relative_error(adapted, base) > 0.1, f"{label}: the trained adapter hardly changes the output"
    assert relative_error(effects["fp8"], effects["bf16"]) < FP8_TOLERANCE


# -- training with offloading ---------------------------------------------------------------------------------


def sd15_run(tiny_sd15, **options):
    (positive,) = importlib.import_module("nodes").CLIPTextEncode().encode(tiny_sd15.clip, "a photo of sks toy")
    latents = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    training = pack("tlora.options").TrainingOptions(**{"steps": 3, "learning_rate": 1e-2, **options})
    return pack("nodes.train").train(tiny_sd15.model, latents, training, positive=positive)


def assert_same_adapter(a, b, atol: float = 1e-5):
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        torch.testing.assert_close(a.tensors[key].float(), b.tensors[key].float(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize(("method", "checkpointing"), [("tlora", False), ("soda", True)])
def test_a_partial_load_trains_the_same_adapter_as_a_full_load(tiny_sd15, method, checkpointing):
    """max_weight_memory far below the model's size: ComfyUI keeps most layers in system memory and casts them in
    at each call (on this CPU host the same copy, through the same code), for the whole run."""
    casting = []
    hooks = [
        m.register_forward_pre_hook(lambda m, _: casting.append(m.comfy_cast_weights))
        for m in tiny_sd15.model.model.diffusion_model.modules()
        if hasattr(m, "comfy_cast_weights") and getattr(m, "weight", None) is not None
    ]
    try:
        full = sd15_run(tiny_sd15, method=method, gradient_checkpointing=checkpointing)
        assert casting and not any(casting)
        casting.clear()
        partial = sd15_run(tiny_sd15, method=method, gradient_checkpointing=checkpointing, max_weight_memory=0.02)
        assert sum(casting) > 0.9 * len(casting), "the partial load did not hold through training"
    finally:
        for hook in hooks:
            hook.remove()
    assert full.losses == pytest.approx(partial.losses, rel=1e-5)
    assert_same_adapter(full, partial)
    assert not all(torch.equal(t, torch.zeros_like(t)) for t in partial.tensors.values())


def test_the_bypass_option_trains_the_same_adapter_on_a_plain_model(tiny_sd15):
    assert_same_adapter(sd15_run(tiny_sd15, method="lora"), sd15_run(tiny_sd15, method="lora", bypass_mode=True))


def test_a_run_no_offloading_can_fit_is_refused_before_loading(tiny_sd15, comfy):
    """A latent batch of 8192² (zero-stride: no memory) needs more activations than this machine has."""
    from comfy import model_management

    (positive,) = importlib.import_module("nodes").CLIPTextEncode().encode(tiny_sd15.clip, "a photo")
    model_management.unload_all_models()
    huge = {"samples": torch.zeros(1, 4, 1, 1).expand(1, 4, 8192, 8192)}
    options = pack("tlora.options").TrainingOptions(steps=1, output_name="big/refused")
    output = comfy.dirs.loras / "big" / "refused.safetensors"
    with pytest.raises(ValueError, match=r"this run needs about [\d.]+ GiB on cpu \(activations ≈ [\d.]+ GiB.*") as err:
        pack("nodes.train").train(tiny_sd15.model, huge, options, positive=positive, output=output)
    assert "gradient_checkpointing" in str(err.value) and not output.exists()
    assert not model_management.current_loaded_models, "refused after loading the model"


# -- aspect-ratio buckets -------------------------------------------------------------------------------------


def test_three_aspect_ratios_train_in_buckets_one_bucket_a_batch(comfy, tiny_sd15):
    """Load Training Images buckets a square, a wide and a tall pair of images whole (each image to the bucket of
    its own aspect ratio); through VAE Encode (once per bucket, as ComfyUI runs a list) into Train TLoRA, every
    micro-batch holds images of one bucket, each with its own conditioning."""
    import numpy as np
    from PIL import Image

    folder = comfy.dirs.input / "buckets_three"
    folder.mkdir(exist_ok=True)
    sizes = {"square": (96, 96), "wide": (150, 90), "tall": (90, 150)}
    for kind, (w, h) in sizes.items():
        for i in range(2):
            pixels = np.random.default_rng(len(kind) + i).integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{kind}{i}.png")
    images, captions = pack("nodes.dataset").LoadTrainingImages.execute("buckets_three", 0, 0, "a photo", 64, 16).args
    assert captions == ["a photo\na photo"] * 3
    assert [tuple(p.shape[1:3]) for p in images] == [(80, 48), (64, 64), (48, 80)]  # (H, W): tall, square, wide
    encode = importlib.import_module("nodes").VAEEncode().encode
    latents = [encode(tiny_sd15.vae, pixels)[0] for pixels in images]
    assert [tuple(latent["samples"].shape) for latent in latents] == [(2, 4, 10, 6), (2, 4, 8, 8), (2, 4, 6, 10)]

    # One latent per image, interleaved (Train TLoRA regroups them); image i's conditioning is filled with i, so
    # the model's context tells which images a batch holds.
    latents = [{"samples": latent["samples"][j : j + 1]} for j in range(2) for latent in latents]
    shapes = [tuple(latent["samples"].shape[2:]) for latent in latents]
    positive = [[[torch.full((1, 77, 768), float(i)), {}]] for i in range(6)]
    seen = []

    def record(module, args, kwargs):
        context, x = kwargs["context"], args[0]
        seen.append((tuple(x.shape[2:]), [int(context[j, 0, 0].round()) for j in range(x.shape[0])]))

    train_node = pack("nodes.train")
    options = pack("tlora.options").TrainingOptions(
        method="lora", steps=8, batch_size=2, learning_rate=1e-2, output_name="big/buckets", overwrite=True
    )
    values = {f.name: [getattr(options, f.name)] for f in train_node.NODE_OPTIONS}
    values["resume_from"] = [train_node.RESUME_NONE]
    hook = tiny_sd15.model.model.diffusion_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        output = train_node.TrainTLoRA.execute(model=[tiny_sd15.model], latents=latents, positive=positive, **values)
    finally:
        hook.remove()
    tensors = output.args[1]
    assert len(seen) == 8 and {shape for shape, _ in seen} == set(shapes)
    for shape, images_in_batch in seen:
        assert len(images_in_batch) == 2 and all(shapes[i] == shape for i in images_in_batch), (shape, images_in_batch)
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(t.abs().max() > 0 for t in ups)  # LoRA's up starts at zero: the parameters moved


def test_soda_trained_on_scaled_fp8_passes_apply_tlora_fingerprint_check(source, comfy):
    """SODA records its base weight's fingerprint; on a scaled-fp8 model that is the dequantized weight (what the
    layer computes with), which Apply TLoRA must compare against, not the raw fp8 numbers it stores."""
    fp8 = source.load("scaled_fp8")
    latents = {"samples": torch.randn(1, *source.latent, generator=torch.Generator().manual_seed(0))}
    options = pack("tlora.options").TrainingOptions(method="soda", steps=2, seed=0)
    name = f"big/{source.key}_scaled_fp8_soda.safetensors"
    (comfy.dirs.loras / name).unlink(missing_ok=True)
    pack("nodes.train").train(fp8, latents, options, positive=source.positive, output=comfy.dirs.loras / name)
    applied, _ = pack("nodes.apply").ApplyTLoRA.execute(fp8, name, 1.0, 0.0).args  # on_fingerprint_mismatch: refuse
    assert applied is not fp8
