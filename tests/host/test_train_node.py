"""Train TLoRA against a real ComfyUI: it learns, the file reproduces the model, and cancel,
NaN, resume, determinism and bad inputs behave as promised."""

import importlib

import pytest
import torch

STEPS = 6


def pack(name):
    return importlib.import_module(f"comfyui_tlora.{name}")


def comfy_nodes():
    return importlib.import_module("nodes")


@pytest.fixture(scope="module")
def data(tiny_sd15):
    (positive,) = comfy_nodes().CLIPTextEncode().encode(tiny_sd15.clip, "a photo of sks toy")
    latents = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    return latents, positive


def run(tiny_sd15, data, name, method="tlora", steps=STEPS, resume_path=None, **options):
    defaults = {"learning_rate": 1e-3, "residual_rank": 4 if method in ("lora", "tlora_star") else 6}
    training = pack("tlora.options").TrainingOptions(method=method, steps=steps, **{**defaults, **options})
    output = pack("nodes.folders").output_path(name) if name else None
    return pack("nodes.train").train(
        tiny_sd15.model, data[0], training, positive=data[1], output=output, resume_path=resume_path
    )


def patched_weights(model_patcher, keys):
    """The weights ComfyUI computes for a patched model (unload whatever clone holds the
    shared weights, patch, read, restore)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    model_patcher.patch_model()
    try:
        state = model_patcher.model.state_dict()
        return {k: state[k].detach().float().clone() for k in keys}
    finally:
        model_patcher.unpatch_model()


def denoising_error(model_patcher, latents, positive, seed=123):
    """ε-MSE of the model at fixed noise levels and noise, through ComfyUI's apply_model."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher])
    base = model_patcher.model
    gen = torch.Generator().manual_seed(seed)
    x0 = base.process_latent_in(latents["samples"])
    sigma = torch.stack([base.model_sampling.percent_to_sigma(p) * torch.ones(()) for p in (0.3, 0.5, 0.7)])
    errors = []
    for s in sigma:
        noise = torch.randn(x0.shape, generator=gen)
        xt = x0 + noise * s
        with torch.no_grad():
            denoised = base.apply_model(xt, s.repeat(x0.shape[0]), c_crossattn=positive[0][0].repeat(x0.shape[0], 1, 1))
        errors.append(((xt - denoised) / s - noise).pow(2).mean().item())
    return sum(errors) / len(errors)


@pytest.mark.parametrize("method", ["tlora", "soda", "lora"])
def test_training_drives_the_loss_down(tiny_sd15, data, method):
    base_error = denoising_error(tiny_sd15.model, *data)
    result = run(tiny_sd15, data, None, method=method, steps=12, learning_rate=3e-3 if method != "soda" else 1e-3)
    assert len(result.losses) == 12 and all(map(torch.isfinite, map(torch.tensor, result.losses)))
    assert denoising_error(result.model, *data) < base_error


def test_saved_file_reproduces_the_trained_model(tiny_sd15, data, comfy):
    result = run(tiny_sd15, data, "repro_tlora")
    assert result.path.exists() and result.path.parent == comfy.dirs.loras
    weight_keys = [k.split(".tlora.")[0] + ".weight" for k in result.tensors if k.endswith(".tlora.scale")]
    assert len(weight_keys) == 32  # q, k, v, out of attn1/attn2 in the tiny UNet's 4 transformer blocks
    trained = patched_weights(result.model, weight_keys)

    apply = pack("nodes.apply").ApplyTLoRA
    (via_node, _) = apply.execute(tiny_sd15.model, result.path.name, 1.0, 1.0, tiny_sd15.clip).args
    (via_stock, _) = comfy_nodes().LoraLoader().load_lora(tiny_sd15.model, tiny_sd15.clip, result.path.name, 1.0, 1.0)
    base = patched_weights(tiny_sd15.model, weight_keys)
    for other in (patched_weights(via_node, weight_keys), patched_weights(via_stock, weight_keys)):
        for k in weight_keys:
            assert not torch.equal(trained[k], base[k])
            torch.testing.assert_close(other[k], trained[k], rtol=0, atol=0)

    meta = pack("tlora.format").load_adapter_file(result.path).metadata
    assert meta["tlora.steps"] == str(STEPS) and meta["tlora.method"] == "tlora" and meta["tlora.base_model"] == "SD15"


def test_same_seed_same_adapter(tiny_sd15, data):
    a, b = run(tiny_sd15, data, None, seed=5), run(tiny_sd15, data, None, seed=5)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    c = run(tiny_sd15, data, None, seed=6)
    assert not all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("method", ["tlora", "soda"])
def test_resume_equals_training_at_once(tiny_sd15, data, method):
    straight = run(tiny_sd15, data, None, method=method, steps=6)
    first = run(tiny_sd15, data, f"resume_{method}", method=method, steps=3)
    resumed = run(tiny_sd15, data, f"resume_{method}", method=method, steps=6, resume_path=first.path)
    assert resumed.steps == 6 and resumed.losses[:3] == first.losses
    for k in straight.tensors:
        torch.testing.assert_close(resumed.tensors[k], straight.tensors[k], atol=1e-5, rtol=1e-4)


def test_cancel_stops_within_a_step_and_saves(tiny_sd15, data):
    import comfy.model_management
    import comfy.utils

    def cancel_at_two(value, total, preview=None, node_id=None):
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(cancel_at_two)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(tiny_sd15, data, "cancelled", steps=50)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    path = pack("nodes.folders").output_path("cancelled")
    meta = pack("tlora.format").load_adapter_file(path).metadata
    assert meta["tlora.steps"] == "2" and meta["tlora.interrupted"] == "true"


def test_non_finite_loss_stops_and_keeps_the_last_good_save(tiny_sd15, data):
    latents = {"samples": torch.stack([data[0]["samples"][0], torch.full((4, 8, 8), float("nan"))])}
    expected = r"loss became nan at step (\d+).*last good save is nan_run.safetensors"
    with pytest.raises(ValueError, match=expected) as err:
        run(tiny_sd15, (latents, data[1]), "nan_run", steps=40, batch_size=1, save_every=1)
    failed_at = int(err.value.args[0].split("at step ")[1].split(";")[0])
    file = pack("tlora.format").load_adapter_file(pack("nodes.folders").output_path("nan_run"))
    assert file.metadata["tlora.steps"] == str(failed_at - 1)
    assert all(torch.isfinite(t).all() for group in file.modules.values() for t in group.values())


def test_bad_inputs_are_named(tiny_sd15, data):
    node = pack("nodes.train").TrainTLoRA
    args = dict(
        model=tiny_sd15.model,
        latents=data[0],
        positive=data[1],
        method="tlora",
        transform_rank=2,
        residual_rank=6,
        steps=2,
        learning_rate=1e-3,
        batch_size=1,
        seed=0,
        output_name="bad_inputs",
    )

    def execute(**values):  # the node takes every input as a list (is_input_list)
        return node.execute(**{name: [value] for name, value in values.items()})

    with pytest.raises(ValueError, match="steps must be at least 1"):
        execute(**{**args, "steps": 0})
    with pytest.raises(ValueError, match="no training images"):
        execute(**{**args, "latents": {"samples": torch.zeros(0, 4, 8, 8)}})
    with pytest.raises(ValueError, match="3 conditionings for 2 images"):
        execute(**{**args, "positive": data[1] * 3})
    with pytest.raises(ValueError, match=r"method must be one of \['tlora'"):
        execute(**{**args, "method": "dora"})
    with pytest.raises(ValueError, match="must be a plain name inside the loras folder"):
        execute(**{**args, "output_name": "../escape"})
    made = run(tiny_sd15, data, "exists_already", steps=1)
    with pytest.raises(ValueError, match="already exists"):
        execute(**{**args, "output_name": "exists_already"})
    with pytest.raises(ValueError, match="trained with 'tlora', not 'lora'"):
        execute(**{**args, "method": "lora", "output_name": "resume_other", "resume_from": made.path.name})
    with pytest.raises(ValueError, match="is not in ComfyUI's loras folders"):
        execute(**{**args, "resume_from": "missing.safetensors"})


def test_example_workflow_trains_and_samples(comfy_server, tiny_checkpoint):
    """example_workflows/train_tlora.json through the real server: images + captions →
    Train TLoRA → save → a sample generated with the trained model."""
    import numpy as np
    from PIL import Image

    from tools.comfyui_host import REPO_ROOT

    from .workflow import load_workflow, ui_to_api

    folder = comfy_server.input_dir / "my_subject"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of my_subject, view {i}")
    workflow = load_workflow(REPO_ROOT / "example_workflows" / "train_tlora.json")
    prompt = ui_to_api(workflow, comfy_server.object_info(refresh=True))
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = tiny_checkpoint.name
    by_type["TLoRALoadTrainingImages"].update(width=64, height=64)
    by_type["TLoRATrain"].update(steps=2, save_every=0, output_name="example_run")
    by_type["EmptyLatentImage"].update(width=64, height=64)
    by_type["KSampler"]["steps"] = 2
    history = comfy_server.run(prompt, timeout=600)
    images = [f for f in comfy_server.output_files(history) if f.name.startswith("tlora_sample")]
    assert len(images) == 1 and images[0].is_file()
    adapter = comfy_server.loras_dir / "example_run.safetensors"
    assert adapter.is_file()
    assert pack("tlora.format").load_adapter_file(adapter).metadata["tlora.steps"] == "2"


def test_trains_a_model_loaded_as_comfyui_loads_it(tiny_checkpoint, data):
    """ComfyUI runs nodes under torch.inference_mode: weights and conditioning are inference
    tensors, which autograd cannot save. Training must still work."""
    from types import SimpleNamespace

    import comfy.sd

    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
        (positive,) = comfy_nodes().CLIPTextEncode().encode(clip, "a photo of sks toy")
        latents = {"samples": data[0]["samples"].clone()}
    assert next(model.model.parameters()).is_inference()
    result = run(SimpleNamespace(model=model), (latents, positive), None, steps=2)
    assert len(result.losses) == 2 and all(v == v for v in result.losses)


def test_batched_factors_train_like_each_layers_own_path(tiny_sd15, data):
    """The GPU default (same-shaped layers' factors built together, tlora.batched) trains the
    same adapter as the per-layer paths the CPU uses."""
    per_layer = run(tiny_sd15, data, None, steps=4, batched_factors=False)
    batched = run(tiny_sd15, data, None, steps=4, batched_factors=True)
    torch.testing.assert_close(torch.tensor(batched.losses), torch.tensor(per_layer.losses), rtol=1e-4, atol=1e-6)
    for k in per_layer.tensors:
        torch.testing.assert_close(batched.tensors[k], per_layer.tensors[k], rtol=1e-3, atol=1e-5)


def test_training_runs_in_comfyuis_training_mode(tiny_sd15, data):
    """ComfyUI's own trainer sets comfy.model_management.in_training (newer models then avoid
    inference-only kernels); the pack's does too, and restores it, where the host has the flag."""
    import comfy.model_management as mm
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: seen.append(getattr(mm, "in_training", None)))
    try:
        run(tiny_sd15, data, None, steps=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    if hasattr(mm, "in_training"):
        assert seen[1:] == [True, True] and mm.in_training is False
    else:
        assert set(seen) == {None}
