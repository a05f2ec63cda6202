"""Load Training Images (TLoRA): a folder of images with a caption ``.txt`` beside each, read
into IMAGE batches and their captions (one line each), for Train TLoRA's latents (through
VAE Encode) and its clip + captions inputs. The folder rules, the reading and the buckets live in
``tlora/dataset.py``.

Both outputs are lists (one item per aspect-ratio bucket; one item when the images share one
size): ComfyUI runs VAE Encode once per bucket, and Train TLoRA takes the list whole."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..tlora.dataset import bucket_table, check_folder, load_buckets, load_images
from .folders import TRAINING_CATEGORY

log = logging.getLogger("comfyui-tlora")


class LoadTrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRALoadTrainingImages",
            display_name="Load Training Images (TLoRA)",
            category=TRAINING_CATEGORY,
            description="Images of a folder in ComfyUI's input directory, with the caption .txt beside each: "
            "all at their own size, cropped to one size, or in aspect-ratio buckets (one batch per bucket).",
            inputs=[
                io.Combo.Input("folder", options=folder_paths.get_input_subfolders(), tooltip="A folder in input/."),
                io.Int.Input("width", default=0, min=0, max=8192, step=8, tooltip="0: keep the images' own size."),
                io.Int.Input("height", default=0, min=0, max=8192, step=8, tooltip="0: keep the images' own size."),
                io.String.Input("default_caption", default="", tooltip="For images without a .txt (empty: error)."),
                io.Int.Input(
                    "bucket_resolution",
                    default=0,
                    min=0,
                    max=8192,
                    step=64,
                    optional=True,
                    tooltip="Aspect-ratio buckets of about this² pixels (e.g. 512, 1024), each image scaled to "
                    "the bucket closest to its shape; 0: off.",
                ),
                io.Int.Input(
                    "bucket_step",
                    default=64,
                    min=8,
                    max=512,
                    step=8,
                    optional=True,
                    tooltip="Bucket sides are multiples of this.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", is_output_list=True, tooltip="One batch per bucket."),
                io.String.Output(
                    display_name="captions", is_output_list=True, tooltip="One line per image, per bucket."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder, width, height, default_caption="", bucket_resolution=0) -> bool | str:
        """Checked when the prompt is queued, before any node runs (no model loads for a folder
        with an unreadable image or caption)."""
        if folder not in folder_paths.get_input_subfolders():
            return f"no folder {folder!r} in ComfyUI's input directory: put your images in input/<folder>/"
        if (width == 0) != (height == 0):
            return "set both width and height (to crop and resize), or neither (keep the images' size)"
        if width and bucket_resolution:
            return "set width and height (one size, cropped) or bucket_resolution (buckets), not both"
        try:
            check_folder(Path(folder_paths.get_input_directory()) / folder, default_caption or None)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, folder, width, height, default_caption="", bucket_resolution=0, bucket_step=64) -> io.NodeOutput:
        path = Path(folder_paths.get_input_directory()) / folder
        if bucket_resolution:
            buckets = load_buckets(path, bucket_resolution, bucket_step, default_caption or None)
            log.info(bucket_table([b.size for b in buckets], [len(b.names) for b in buckets]))
            return io.NodeOutput([b.pixels for b in buckets], ["\n".join(b.captions) for b in buckets])
        size = (width, height) if width else None
        pixels, captions = load_images(path, size, default_caption or None)
        return io.NodeOutput([pixels], ["\n".join(captions)])


NODES = [LoadTrainingImages]
