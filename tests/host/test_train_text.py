"""Train TLoRA's text side against a real ComfyUI: captions encoded in the loop train the
text encoder, a batch keeps each image's own caption, previews come through ComfyUI's
progress bar, and the pack's image-folder node feeds the trainer."""

import importlib

import pytest
import torch

CAPTIONS = ["a photo of sks toy", "a drawing of a red sks car on a long winding road " * 9]  # 77 and 154 tokens


def pack(name):
    return importlib.import_module(f"comfyui_tlora.{name}")


@pytest.fixture(scope="module")
def latents():
    return {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}


def train_text(tiny_sd15, latents, name=None, targets="attention,text_attention", steps=4, preview_vae=None, **options):
    training = pack("tlora.options").TrainingOptions(
        method="tlora", targets=targets, steps=steps, learning_rate=3e-3, batch_size=2, **options
    )
    output = pack("nodes.folders").output_path(name) if name else None
    return pack("nodes.train").train(
        tiny_sd15.model,
        latents,
        training,
        clip=tiny_sd15.clip,
        captions=CAPTIONS,
        output=output,
        preview_vae=preview_vae,
    )


def clip_weights(clip, keys):
    import comfy.model_management

    comfy.model_management.unload_all_models()
    clip.patcher.patch_model()
    try:
        state = clip.cond_stage_model.state_dict()
        return {k: state[k].detach().float().clone() for k in keys}
    finally:
        clip.patcher.unpatch_model()


def test_text_encoder_trains_and_its_file_reloads(tiny_sd15, latents):
    result = train_text(tiny_sd15, latents, "with_text_encoder")
    modules = pack("tlora.format").load_adapter_file(result.path).modules
    text = sorted(m for m in modules if m.startswith("text_encoders."))
    assert len(text) == 48  # q, k, v, out of CLIP-L's 12 layers
    assert len(modules) - len(text) == 32  # and the UNet's attention
    keys = [m.removeprefix("text_encoders.") + ".weight" for m in text]
    base, trained = clip_weights(tiny_sd15.clip, keys), clip_weights(result.clip, keys)
    assert all(not torch.equal(base[k], trained[k]) for k in keys)

    apply = pack("nodes.apply").ApplyTLoRA
    (_, via_node) = apply.execute(tiny_sd15.model, result.path.name, 1.0, 1.0, tiny_sd15.clip).args
    (_, via_stock) = (
        importlib.import_module("nodes")
        .LoraLoader()
        .load_lora(tiny_sd15.model, tiny_sd15.clip, result.path.name, 1.0, 1.0)
    )
    for other in (clip_weights(via_node, keys), clip_weights(via_stock, keys)):
        for k in keys:
            torch.testing.assert_close(other[k], trained[k], rtol=0, atol=0)


def test_frozen_text_encoder_with_captions_equals_precomputed_conditioning(tiny_sd15, latents):
    """clip + captions without text targets encode once: the same run as CLIPTextEncode's."""
    train = pack("nodes.train")
    encode = importlib.import_module("nodes").CLIPTextEncode().encode
    positive = [encode(tiny_sd15.clip, c)[0][0] for c in CAPTIONS]
    training = pack("tlora.options").TrainingOptions(
        method="lora", residual_rank=4, steps=3, learning_rate=1e-3, batch_size=2
    )
    via_text = train.train(tiny_sd15.model, latents, training, clip=tiny_sd15.clip, captions=CAPTIONS)
    via_conds = train.train(tiny_sd15.model, latents, training, positive=positive)
    assert via_text.losses == via_conds.losses


def test_a_batch_keeps_each_images_caption(tiny_sd15):
    """One conditioning entry per image in a batch would make ComfyUI average the predictions
    over all captions; the trainer's batch conditioning gives each image its own."""
    import comfy.sampler_helpers
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler

    sampling = pack("nodes.sampling")
    encode = importlib.import_module("nodes").CLIPTextEncode().encode
    positive = [encode(tiny_sd15.clip, c)[0][0] for c in CAPTIONS]
    assert [p[0].shape[1] for p in positive] == [77, 154]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    outputs = {}

    class Probe(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, *_):
            conditioner = sampling.Conditioner(model_wrap.inner_model, positive, None, seed=0)
            sigma = torch.full((2,), 3.0)
            with torch.no_grad():
                model_wrap.conds["positive"] = conditioner([0, 1], x)
                outputs["batch"] = model_wrap(x, sigma)
                singles = []
                for i in (0, 1):
                    model_wrap.conds["positive"] = conditioner([i], x[i : i + 1])
                    singles.append(model_wrap(x[i : i + 1], sigma[:1]))
                outputs["singles"] = torch.cat(singles)
                separate = comfy.sampler_helpers.convert_cond(positive)
                model_wrap.conds["positive"] = comfy.samplers.process_conds(
                    model_wrap.inner_model, x, {"positive": separate}, x.device, latent_image=x
                )["positive"]
                outputs["separate"] = model_wrap(x, sigma)
            return latent_image

    guider = comfy_extras.nodes_custom_sampler.Guider_Basic(tiny_sd15.model)
    guider.set_conds(positive[:1])
    with torch.inference_mode(False):
        guider.sample(torch.zeros_like(x), x, Probe(), torch.tensor([3.0, 0.0]), seed=0)
    torch.testing.assert_close(outputs["batch"], outputs["singles"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outputs["separate"], outputs["singles"], atol=1e-3)


@pytest.mark.parametrize("with_vae", [False, True])
def test_previews_come_every_n_steps_through_the_progress_bar(tiny_sd15, latents, with_vae):
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, node_id=None: seen.append(preview))
    try:
        options = {"preview_every": 2, "preview_vae": tiny_sd15.vae if with_vae else None}
        train_text(tiny_sd15, latents, targets="attention", steps=4, **options)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    previews = [p for p in seen if p is not None]
    assert len(previews) == 2 and len(seen) == 5  # steps 2 and 4 of 0..4
    side = 64 if with_vae else 8  # VAE-decoded pixels, or one preview pixel per latent pixel
    for fmt, image, max_size in previews:
        assert (fmt, max_size, image.size) == ("JPEG", 512, (side, side))
        assert any(lo < hi for lo, hi in image.getextrema())  # an image, not a blank


def test_text_inputs_are_checked(tiny_sd15, latents):
    train = pack("nodes.train").train
    options = pack("tlora.options").TrainingOptions
    text, plain = options(steps=1, targets="attention,text_attention"), options(steps=1)
    with pytest.raises(ValueError, match="needs the CLIP and the captions as text"):
        train(tiny_sd15.model, latents, text, captions=CAPTIONS)
    with pytest.raises(ValueError, match="connect positive conditioning, or clip \\+ captions"):
        train(tiny_sd15.model, latents, plain, clip=tiny_sd15.clip)
    with pytest.raises(ValueError, match="3 captions for 2 images"):
        train(tiny_sd15.model, latents, text, clip=tiny_sd15.clip, captions=["a"] * 3)


def test_load_training_images_node(comfy, tmp_path):
    import folder_paths
    import numpy as np
    from PIL import Image

    node = pack("nodes.dataset").LoadTrainingImages
    folder = comfy.dirs.input / "subject_for_node"
    folder.mkdir(exist_ok=True)
    for i, size in enumerate([(48, 40), (40, 64)]):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a photo\n  of sks ")
    assert "subject_for_node" in folder_paths.get_input_subfolders()
    assert "no folder" in node.validate_inputs("nowhere", 0, 0)
    assert "set both width and height" in node.validate_inputs("subject_for_node", 64, 0)
    with pytest.raises(ValueError, match=r"1 of 2 images .* have no caption file"):
        node.execute("subject_for_node", 0, 0)
    with pytest.raises(ValueError, match="2 different sizes"):
        node.execute("subject_for_node", 0, 0, default_caption="a toy")
    (pixels,), (captions,) = node.execute("subject_for_node", 32, 24, default_caption="a toy").args  # lists
    assert pixels.shape == (2, 24, 32, 3) and captions == "a photo of sks\na toy"
    assert "not both" in node.validate_inputs("subject_for_node", 32, 24, bucket_resolution=64)
    pixels, captions = node.execute("subject_for_node", 0, 0, "a toy", bucket_resolution=64, bucket_step=8).args
    assert [p.shape for p in pixels] == [(1, 80, 48, 3), (1, 56, 72, 3)]  # 40×64 (tall), 48×40 (wide)
    assert captions == ["a toy", "a photo of sks"]
