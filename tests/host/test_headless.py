"""The README's main command, `python -m tlora train …`, end to end in a subprocess with the
host's Python: an image folder with captions in, an adapter file out (text encoder too)."""

import importlib
import subprocess
import sys

import numpy as np

from tools.comfyui_host import REPO_ROOT


def test_headless_training_writes_the_adapter(comfy, tiny_checkpoint, tmp_path):
    from PIL import Image

    images = tmp_path / "subject"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of sks toy, view {i}")
    output = tmp_path / "out" / "subject_tlora.safetensors"
    cmd = [sys.executable, "-m", "tlora", "train", "--comfyui", str(comfy.path), "--checkpoint", str(tiny_checkpoint)]
    cmd += ["--images", str(images), "--output", str(output), "--steps", "2", "--size", "64x64"]
    cmd += ["--targets", "attention,text_attention", "--batch-size", "2"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"saved {output}" in done.stdout and "trained 2 steps on 2 images" in done.stdout
    file = importlib.import_module("comfyui_tlora.tlora.format").load_adapter_file(output)
    assert file.metadata["tlora.steps"] == "2"
    assert any(m.startswith("text_encoders.") for m in file.modules)
    assert any(m.startswith("diffusion_model.") for m in file.modules)

    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr  # never overwritten unless told to


def test_headless_training_in_aspect_ratio_buckets(comfy, tiny_checkpoint, tmp_path):
    from PIL import Image

    images = tmp_path / "mixed"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name, (w, h) in {"a": (96, 96), "b": (150, 90), "c": (150, 90)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
    output = tmp_path / "out" / "mixed.safetensors"
    cmd = [sys.executable, "-m", "tlora", "train", "--comfyui", str(comfy.path), "--checkpoint", str(tiny_checkpoint)]
    cmd += ["--images", str(images), "--output", str(output), "--steps", "2", "--caption", "a photo"]
    cmd += ["--bucket-resolution", "64", "--bucket-step", "16", "--batch-size", "2"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 buckets, 3 images:\n  64×64: 1\n  80×48: 2" in done.stdout
    assert "trained 2 steps on 3 images" in done.stdout and output.exists()
