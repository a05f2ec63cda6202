"""Load Training Images (TLoRA): a folder of images with a caption ``.txt`` beside each, read
into an IMAGE batch and their captions (one line each), for Train TLoRA's latents (through
VAE Encode) and its clip + captions inputs. The folder rules live in ``tlora/dataset.py``."""

from __future__ import annotations

from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps

from ..tlora.dataset import check_same_size, image_caption_pairs


def load_images(folder: Path, size: tuple[int, int] | None, default_caption: str | None):
    """``(pixels [B, H, W, 3] in 0..1, captions)``; all images one size, or center-cropped and
    resized to ``size``. Each caption is one line (its whitespace runs become single spaces)."""
    pairs = image_caption_pairs(folder, default_caption)
    images = [ImageOps.exif_transpose(Image.open(p.image)).convert("RGB") for p in pairs]
    if size is None:
        check_same_size({p.image.name: im.size for p, im in zip(pairs, images, strict=True)})
    else:
        images = [ImageOps.fit(im, size, Image.Resampling.LANCZOS) for im in images]
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))
    return pixels, [" ".join(p.caption.split()) for p in pairs]


class LoadTrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRALoadTrainingImages",
            display_name="Load Training Images (TLoRA)",
            category="training/tlora",
            description="Images of a folder in ComfyUI's input directory, with the caption .txt beside each.",
            inputs=[
                io.Combo.Input("folder", options=folder_paths.get_input_subfolders(), tooltip="A folder in input/."),
                io.Int.Input("width", default=0, min=0, max=8192, step=8, tooltip="0: keep the images' own size."),
                io.Int.Input("height", default=0, min=0, max=8192, step=8, tooltip="0: keep the images' own size."),
                io.String.Input("default_caption", default="", tooltip="For images without a .txt (empty: error)."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.String.Output(display_name="captions")],
        )

    @classmethod
    def validate_inputs(cls, folder, width, height, **_) -> bool | str:
        if folder not in folder_paths.get_input_subfolders():
            return f"no folder {folder!r} in ComfyUI's input directory: put your images in input/<folder>/"
        if (width == 0) != (height == 0):
            return "set both width and height (to crop and resize), or neither (keep the images' size)"
        return True

    @classmethod
    def execute(cls, folder, width, height, default_caption="") -> io.NodeOutput:
        path = Path(folder_paths.get_input_directory()) / folder
        size = (width, height) if width else None
        pixels, captions = load_images(path, size, default_caption or None)
        return io.NodeOutput(pixels, "\n".join(captions))


NODES = [LoadTrainingImages]
