"""``python -m tlora``: the pack's command line.

    python -m tlora info FILE                      what an adapter file is
    python -m tlora train --comfyui PATH …         train headless through a ComfyUI install
    python -m tlora budgets                        parameter budgets at SD1.5 / SDXL shapes
    python -m tlora export FILE --checkpoint CKPT --rank R --output OUT [--bake]
                                                   a plain LoRA (or weight diffs) from any adapter file

``train`` loads ComfyUI from ``--comfyui`` (or ``$COMFYUI_PATH``) and this pack the way
ComfyUI does, then runs the Train TLoRA node's own trainer; the core never imports ComfyUI.
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

REPO = Path(__file__).resolve().parents[1]
PACK = "comfyui_tlora"


def load_host(comfy_path: Path):
    """Import ComfyUI from ``comfy_path`` (CPU unless CUDA is there) and this pack as a package."""
    if not (comfy_path / "main.py").is_file() or not (comfy_path / "comfy").is_dir():
        raise SystemExit(f"{comfy_path} is not a ComfyUI folder (no main.py and comfy/): pass --comfyui PATH")
    sys.path.insert(0, str(comfy_path))  # before this repo: ComfyUI's nodes.py, not the pack's nodes/
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    importlib.import_module("nodes")
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return importlib.import_module(f"{PACK}.nodes.headless")


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
    train = commands.add_parser("train", help="train an adapter on an image folder, headless")
    train.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        args, _ = train.parse_known_args(argv[1:])
        if args.comfyui is None:
            train.error("needs a ComfyUI: --comfyui PATH or COMFYUI_PATH")
        headless = load_host(Path(args.comfyui))
        headless.add_arguments(train)
        args = parser.parse_args(argv)
        try:
            return headless.run(args)
        except (ValueError, FileExistsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    if args.command == "budgets":
        runpy.run_path(str(REPO / "bench" / "budgets.py"), run_name="__main__")
        return 0
    from .format import AdapterFileError, describe, load_adapter_file

    if args.command == "export":
        return run_export(args)
    try:
        print(json.dumps(describe(load_adapter_file(args.file)), indent=2))
    except AdapterFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


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
