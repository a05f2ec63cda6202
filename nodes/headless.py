"""Train TLoRA without the UI: ComfyUI as a library, an image folder read by the core, the node's
own trainer (``nodes.train.train``). Entry point: ``python -m tlora train …`` (its arguments are
defined in tlora/__main__.py and tlora/options.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import comfy.sd
import comfy.utils
import torch

from ..tlora.dataset import bucket_table, load_buckets, load_images
from ..tlora.options import TrainingOptions
from .train import train


def run(args: argparse.Namespace, options: TrainingOptions) -> int:
    output = Path(options.output_name)
    if output.suffix != ".safetensors":
        output = output.with_suffix(".safetensors")
    if args.bucket_resolution and args.size:
        raise ValueError("give --size (one size, cropped) or --bucket-resolution (buckets), not both")
    if args.bucket_resolution:
        buckets = load_buckets(args.images, args.bucket_resolution, args.bucket_step, args.caption)
        print(bucket_table([b.size for b in buckets], [len(b.names) for b in buckets]))
        batches, captions = [b.pixels for b in buckets], [c for b in buckets for c in b.captions]
    else:
        pixels, captions = load_images(args.images, args.size, args.caption)
        batches = [pixels]
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True, output_clip=True)
    if clip is None or vae is None:
        raise ValueError(f"{args.checkpoint.name} has no text encoder or VAE: the trainer needs both to read images")
    with torch.no_grad():
        latents = [{"samples": vae.encode(pixels)} for pixels in batches]
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview=None, node_id=None: print(f"\rstep {value}/{total}", end="", file=sys.stderr)
    )
    result = train(
        model,
        latents,
        options,
        clip=clip,
        captions=captions,
        output=output,
        resume_path=Path(options.resume_from) if options.resume_from else None,
    )
    print(f"\ntrained {result.steps} steps on {len(captions)} images, final loss {result.losses[-1]:.4f}")
    print(f"saved {result.path}")
    return 0
