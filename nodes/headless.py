"""Train TLoRA without the UI: load ComfyUI as a library, read an image folder, run the same
trainer as the node (``nodes.train.train``). Entry point: ``python -m tlora train …``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import comfy.sd
import comfy.utils
import torch

from ..tlora.model import METHODS
from ..tlora.train import TrainConfig
from .dataset import load_images
from .train import AdapterSpec, RunOptions, train


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    if w % 8 or h % 8 or w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text!r}")
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint ComfyUI loads (SD1.5, SDXL, …)")
    parser.add_argument("--images", required=True, type=Path, help="folder of images with a caption .txt beside each")
    parser.add_argument("--output", required=True, type=Path, help="the adapter file to write (.safetensors)")
    parser.add_argument("--method", default="tlora", choices=METHODS)
    parser.add_argument("--transform-rank", type=int, default=2)
    parser.add_argument("--residual-rank", type=int, default=6)
    parser.add_argument(
        "--targets", default="attention", help="comma-separated target groups (text_attention: the text encoder)"
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--rotation-learning-rate", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accumulation", type=int, default=1)
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--loss", default="mse", choices=["mse", "dco"])
    parser.add_argument("--training-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--size", type=parse_size, help="center-crop and resize every image to WxH")
    parser.add_argument("--caption", help="caption for images without a .txt file")
    parser.add_argument("--resume", type=Path, help="an adapter file (with its .tlora-state) to continue")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    spec = AdapterSpec(args.method, args.transform_rank, args.residual_rank, targets=tuple(args.targets.split(",")))
    config = TrainConfig(
        steps=args.steps,
        learning_rate=args.learning_rate,
        rotation_learning_rate=args.rotation_learning_rate,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        grad_accumulation=args.grad_accumulation,
        seed=args.seed,
        loss=args.loss,
    )
    output = args.output if args.output.suffix == ".safetensors" else args.output.with_suffix(".safetensors")
    pixels, captions = load_images(args.images, args.size, args.caption)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=True, output_clip=True)
    if clip is None or vae is None:
        raise ValueError(f"{args.checkpoint.name} has no text encoder or VAE: the trainer needs both to read images")
    with torch.no_grad():
        latents = vae.encode(pixels)
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview=None, node_id=None: print(f"\rstep {value}/{total}", end="", file=sys.stderr)
    )
    options = RunOptions(
        training_dtype=args.training_dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every,
        output_path=output,
        overwrite=args.overwrite,
        resume_path=args.resume,
    )
    result = train(model, {"samples": latents}, None, spec, config, options, clip=clip, captions=captions)
    print(f"\ntrained {result.steps} steps on {len(captions)} images, final loss {result.losses[-1]:.4f}")
    print(f"saved {result.path}")
    return 0
