"""Train TLoRA without the UI: ComfyUI as a library, an image folder read by the core, the node's
own trainer (``nodes.train.train``). Entry point: ``python -m tlora train …`` (its arguments are
defined in tlora/__main__.py and tlora/options.py), one process or one rank of a torchrun job:
every rank loads the model and the images, rank 0 alone writes files and shows progress."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import torch

from ..tlora.dataset import bucket_table, load_buckets, load_images
from ..tlora.distributed import DataParallel
from ..tlora.options import TrainingOptions
from ..tlora.progress import TrainingProgress
from .train import train


def preview_saver(output: Path):
    """A ComfyUI progress hook that writes each training preview to ``<name>.previews/<step>.jpg``."""

    def hook(value, total, preview=None, node_id=None):
        if preview is not None:
            folder = output.with_suffix(".previews")
            folder.mkdir(parents=True, exist_ok=True)
            preview[1].save(folder / f"{value:06d}.jpg")

    return hook


def run(args: argparse.Namespace, options: TrainingOptions, parallel: DataParallel) -> int:
    world = parallel.world
    parallel.interrupt = comfy.model_management.InterruptProcessingException  # train() saves on it
    output = Path(options.output_name)
    if output.suffix != ".safetensors":
        output = output.with_suffix(".safetensors")
    if args.bucket_resolution and args.size:
        raise ValueError("give --size (one size, cropped) or --bucket-resolution (buckets), not both")
    if args.bucket_resolution:
        buckets = load_buckets(args.images, args.bucket_resolution, args.bucket_step, args.caption)
        if world.is_main:
            print(bucket_table([b.size for b in buckets], [len(b.names) for b in buckets]), flush=True)
        batches, captions = [b.pixels for b in buckets], [c for b in buckets for c in b.captions]
    else:
        pixels, captions = load_images(args.images, args.size, args.caption)
        batches = [pixels]
    summary = world.batch_summary(options.batch_size, options.grad_accumulation, len(captions))
    if world.is_main:
        print(summary, flush=True)
    with parallel.stop_on_signals():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(args.checkpoint), output_vae=True, output_clip=True
        )
        if clip is None or vae is None:
            raise ValueError(
                f"{args.checkpoint.name} has no text encoder or VAE: the trainer needs both to read images"
            )
        with torch.no_grad():
            latents = [{"samples": vae.encode(pixels)} for pixels in batches]
        progress = None
        if world.is_main:
            images_per_step = min(len(captions), options.batch_size * world.size) * options.grad_accumulation
            progress = TrainingProgress(options.steps, images_per_step)
            comfy.utils.set_progress_bar_global_hook(preview_saver(output))
        try:
            with contextlib.closing(progress) if progress else contextlib.nullcontext():
                result = train(
                    model,
                    latents,
                    options,
                    clip=clip,
                    captions=captions,
                    output=output if world.is_main else None,
                    resume_path=Path(options.resume_from) if options.resume_from else None,
                    sync=parallel,
                    on_step=progress,
                )
        except comfy.model_management.InterruptProcessingException as stopped:
            if parallel.lost:
                print(f"error: {parallel.lost}", file=sys.stderr)
                return 1
            parallel.wait_for_all()  # rank 0 has saved before anyone leaves
            if world.is_main:
                print(f"stopped: {stopped}", file=sys.stderr)
            return 130
    if world.is_main:
        print(f"trained {result.steps} steps on {len(captions)} images, final loss {result.losses[-1]:.4f}")
        print(f"saved {result.path}")
    return 0
