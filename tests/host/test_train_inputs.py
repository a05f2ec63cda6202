"""Train TLoRA and Load Training Images on a real ComfyUI against the report's careless and hostile cases
(issue 17): a NaN update stops before any save and names the good one, a pair of files from two saves
is refused (or resumed adapter-only), a truncated state is named, a NUL output name is refused when the
prompt is queued (before the checkpoint loads), a batch larger than the dataset is clamped and recorded,
and unreadable images and captions are named."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch


def pack(name):
    return importlib.import_module(f"comfyui_tlora.{name}")


@pytest.fixture(scope="module")
def data(tiny_sd15):
    (positive,) = importlib.import_module("nodes").CLIPTextEncode().encode(tiny_sd15.clip, "a photo of sks toy")
    return {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}, positive


def run(tiny_sd15, data, name, steps=2, resume_path=None, **options):
    training = pack("tlora.options").TrainingOptions(steps=steps, learning_rate=1e-3, **options)
    output = pack("nodes.folders").output_path(name) if name else None
    return pack("nodes.train").train(
        tiny_sd15.model, data[0], training, positive=data[1], output=output, resume_path=resume_path
    )


def test_a_nan_update_stops_before_any_save_and_names_the_good_one(tiny_sd15, data, monkeypatch):
    """The report's bf16 case, made exact: step 3's gradient is NaN while its loss is finite, so
    the update (not the loss) turns the weights to NaN; save_every=1 must not write them."""
    trainer_cls = pack("tlora.train").Trainer
    original = trainer_cls.__post_init__

    def poisoned(self):
        original(self)
        self.parameters()[0].register_hook(lambda g: g * float("nan") if self.step + 1 == 3 else g)

    monkeypatch.setattr(trainer_cls, "__post_init__", poisoned)
    with pytest.raises(ValueError) as err:
        run(tiny_sd15, data, "nan_update", steps=10, save_every=1)
    message = str(err.value)
    assert "the update of step 3 made the adapter weights NaN or infinite" in message
    assert "the last good save is nan_update.safetensors (step 2)" in message
    file = pack("tlora.format").load_adapter_file(pack("nodes.folders").output_path("nan_update"))
    assert file.metadata["tlora.steps"] == "2"  # load_adapter_file refuses NaN: this one is good
    apply = pack("nodes.apply").ApplyTLoRA
    apply.execute(tiny_sd15.model, "nan_update.safetensors", 1.0, 1.0)


def test_a_batch_larger_than_the_dataset_is_clamped_and_recorded(tiny_sd15, data, caplog):
    with caplog.at_level(logging.WARNING, logger="comfyui-tlora"):
        result = run(tiny_sd15, data, "batch_clamped", steps=1, batch_size=8)
    assert "batch_size 8 is larger than the 2 training images: training at batch size 2" in caplog.text
    meta = pack("tlora.format").load_adapter_file(result.path).metadata
    assert json.loads(meta["tlora.training"])["batch_size"] == 2


def test_a_pair_from_two_saves_is_refused_or_resumed_adapter_only(tiny_sd15, data):
    first = run(tiny_sd15, data, "pair", steps=2)
    state = pack("tlora.run").state_path(first.path)
    old_state = state.read_bytes()
    run(tiny_sd15, data, "pair", steps=4, resume_path=first.path)
    state.write_bytes(old_state)  # as a kill between the two renames of a save leaves them
    expected = r"pair\.safetensors is at step 4 but its optimizer state .* at step 2: "
    with pytest.raises(ValueError, match=expected) as e:
        run(tiny_sd15, data, "pair", steps=6, resume_path=first.path)
    assert "pair.safetensors.tlora-state is older" in str(e.value) and "resume_adapter_only" in str(e.value)
    resumed = run(tiny_sd15, data, "pair", steps=6, resume_path=first.path, resume_adapter_only=True)
    assert resumed.steps == 6 and len(resumed.losses) == 2  # steps 5 and 6, on a fresh optimizer


def test_a_truncated_state_is_named(tiny_sd15, data):
    first = run(tiny_sd15, data, "truncated_state", steps=2)
    state = pack("tlora.run").state_path(first.path)
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated_state.safetensors.tlora-state is not a readable safetensors"):
        run(tiny_sd15, data, "truncated_state", steps=4, resume_path=first.path)


def test_output_names_are_checked_when_the_prompt_is_queued(comfy):
    node = pack("nodes.train").TrainTLoRA
    assert "contains a control character" in node.validate_inputs(output_name="my\0adapter")
    assert "must be a plain name inside the loras folder" in node.validate_inputs(output_name="../up")
    assert node.validate_inputs(output_name="tlora/fine") is True
    assert node.validate_inputs() is True  # a linked output_name is checked when the node runs


def test_a_nul_output_name_is_refused_before_the_checkpoint_loads(comfy_server, tiny_checkpoint):
    from .server import ComfyServerError

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint.name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a toy"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {
            "class_type": "TLoRATrain",
            "inputs": {
                "model": ["1", 0],
                "latents": ["3", 0],
                "positive": ["2", 0],
                "method": "tlora",
                "transform_rank": 2,
                "residual_rank": 6,
                "steps": 1,
                "learning_rate": 1e-3,
                "batch_size": 1,
                "seed": 0,
                "output_name": "nul\u0000name",
            },
        },
    }
    log_before = len(comfy_server.log())
    with pytest.raises(ComfyServerError, match=r"(?s)/prompt refused the prompt \(400\).*contains a control character"):
        comfy_server.run(prompt, timeout=60)
    log = comfy_server.log()[log_before:]
    assert "Failed to validate prompt for output 4" in log and "Prompt executed" not in log  # no node ran


def test_unreadable_images_and_captions_are_named_when_the_prompt_is_queued(comfy):
    import folder_paths
    from PIL import Image

    node = pack("nodes.dataset").LoadTrainingImages
    root = folder_paths.get_input_directory()
    folder = importlib.import_module("pathlib").Path(root) / "careless_set"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_text("a photo")
    (folder / "b.png").write_text("a text file renamed .png")
    (folder / "b.txt").write_text("another photo")
    assert node.validate_inputs("careless_set", 0, 0).startswith("b.png is not a readable image")
    (folder / "b.png").unlink()
    (folder / "a.txt").write_bytes("une tête".encode("latin-1"))
    assert node.validate_inputs("careless_set", 0, 0) == (
        "caption a.txt is not UTF-8 text (byte 5 is 0xea): save it as UTF-8"
    )
    with pytest.raises(ValueError, match=r"caption a\.txt is not UTF-8"):
        node.execute("careless_set", 0, 0)
