"""Load Training Images (TLoRA): a folder of images with a caption ``.txt`` beside each, read
into an IMAGE batch and their captions (one line each), for Train TLoRA's latents (through
VAE Encode) and its clip + captions inputs. The folder rules and the reading live in
``tlora/dataset.py``."""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..tlora.dataset import check_folder, load_images
from .folders import TRAINING_CATEGORY


class LoadTrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRALoadTrainingImages",
            display_name="Load Training Images (TLoRA)",
            category=TRAINING_CATEGORY,
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
    def validate_inputs(cls, folder, width, height, default_caption="") -> bool | str:
        """Checked when the prompt is queued, before any node runs (no model loads for a folder
        with an unreadable image or caption)."""
        if folder not in folder_paths.get_input_subfolders():
            return f"no folder {folder!r} in ComfyUI's input directory: put your images in input/<folder>/"
        if (width == 0) != (height == 0):
            return "set both width and height (to crop and resize), or neither (keep the images' size)"
        try:
            check_folder(Path(folder_paths.get_input_directory()) / folder, default_caption or None)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, folder, width, height, default_caption="") -> io.NodeOutput:
        path = Path(folder_paths.get_input_directory()) / folder
        size = (width, height) if width else None
        pixels, captions = load_images(path, size, default_caption or None)
        return io.NodeOutput(pixels, "\n".join(captions))


NODES = [LoadTrainingImages]
