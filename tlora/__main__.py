"""``python -m tlora``: the pack's command line.

    python -m tlora info FILE                      what an adapter file is
    python -m tlora train --comfyui PATH …         train headless through a ComfyUI install
    torchrun --nproc_per_node N -m tlora train …   the same, data-parallel over N GPUs (or processes)
    python -m tlora budgets                        parameter budgets at SD1.5 / SDXL shapes
    python -m tlora export FILE --checkpoint CKPT --rank R --output OUT [--bake]
                                                   a plain LoRA (or weight diffs) from any adapter file

Every command's arguments are defined here (``train``'s training options come from
:mod:`tlora.options`), so ``--help`` needs no ComfyUI. ``train`` then boots ComfyUI from
``--comfyui`` (or ``$COMFYUI_PATH``) through the pack's host loader (tools/comfyui_host.py)
and runs the Train TLoRA node's own trainer (nodes/headless.py); the core never imports ComfyUI.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import runpy
import sys
from pathlib import Path

from . import distributed, options

REPO = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    if w % 8 or h % 8 or w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text!r}")
    return w, h


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("model and data")
    data.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder")
    data.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint ComfyUI loads (SD1.5, SDXL, …)")
    data.add_argument("--images", required=True, type=Path, help="folder of images with a caption .txt beside each")
    data.add_argument("--size", type=parse_size, help="center-crop and resize every image to WxH")
    data.add_argument(
        "--bucket-resolution",
        type=int,
        default=0,
        help="aspect-ratio buckets of about this² pixels (e.g. 512, 1024) instead of one size (default: off)",
    )
    data.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this (default: 64)")
    data.add_argument("--caption", help="caption for images without a .txt file")
    options.add_arguments(parser)
    parallel = parser.add_argument_group("data parallel (under torchrun)")
    parallel.add_argument(
        "--dist-timeout",
        type=float,
        default=distributed.STEP_TIMEOUT,
        help="seconds a rank waits for the others at a step before giving up (default: %(default)s)",
    )


def boot_host(comfy_path: Path):
    """The pack as ComfyUI imports it, with ComfyUI booted from ``comfy_path`` (CPU unless CUDA is there)."""
    import torch

    spec = importlib.util.spec_from_file_location("comfyui_tlora_host", REPO / "tools" / "comfyui_host.py")
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    return host.boot(comfy_path, cpu=not torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlora", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="show an adapter file's method, size, layers and training")
    info.add_argument("file", type=Path)
    commands.add_parser("budgets", help="parameter counts at SD1.5 / SDXL attention shapes")
    export = commands.add_parser("export", help="export an adapter file to a plain LoRA at a chosen rank")
    export.add_argument("file", type=Path, help="a TLoRA, SODA or LoRA adapter file")
    export.add_argument("--checkpoint", type=Path, required=True, help="the base model's .safetensors checkpoint")
    export.add_argument("--rank", type=int, default=16, help="LoRA rank (≥ the layer's smaller side: exact)")
    export.add_argument("--output", type=Path, required=True, help="the .safetensors file to write")
    export.add_argument("--bake", action="store_true", help="write full weight diffs (<module>.diff) instead")
    export.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    train = commands.add_parser("train", help="train an adapter on an image folder, headless through ComfyUI")
    add_train_arguments(train)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "budgets":
        runpy.run_path(str(REPO / "bench" / "budgets.py"), run_name="__main__")
        return 0
    if args.command == "export":
        return run_export(args)
    if args.command == "train":
        return run_train(train, args)
    from .format import AdapterFileError, describe, inspect_adapter_file

    try:
        print(json.dumps(describe(inspect_adapter_file(args.file)), indent=2))
    except AdapterFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m tlora train``: options checked before ComfyUI boots, then the node's trainer."""
    if args.comfyui is None:
        parser.error("needs a ComfyUI: --comfyui PATH or COMFYUI_PATH")
    try:
        training = options.from_arguments(args)
    except ValueError as err:
        parser.error(str(err))
    world = distributed.World.from_env()  # torchrun's rank, else one process
    world.select_device()  # before ComfyUI picks its device
    with distributed.DataParallel(world, step_timeout=args.dist_timeout) as parallel:
        pack = boot_host(Path(args.comfyui))
        headless = importlib.import_module(f"{pack.__name__}.nodes.headless")
        try:
            return headless.run(args, training, parallel)
        except (ValueError, FileExistsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2


def run_export(args) -> int:
    """``python -m tlora export``: base weights straight from the checkpoint (no ComfyUI needed)."""
    from safetensors import SafetensorError

    from .export import checkpoint_weights, export_adapter
    from .format import AdapterFileError, load_adapter_file

    try:
        file = load_adapter_file(args.file)
        if not args.checkpoint.is_file():
            raise ValueError(f"checkpoint not found: {args.checkpoint}")
        try:
            weights = checkpoint_weights(args.checkpoint, file.modules)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{args.checkpoint} is not a readable safetensors checkpoint: {err}") from None
        text_encoder = [m for m in file.modules if m.startswith("text_encoders.")]
        report = export_adapter(
            file,
            weights,
            args.output,
            args.rank,
            "bake" if args.bake else "lora",
            overwrite=args.overwrite,
            allow_missing=text_encoder,
        )
    except (AdapterFileError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
