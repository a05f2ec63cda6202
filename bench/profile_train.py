"""Where a training step's time goes: step time and the top ops (torch.profiler) of this
pack's LoRA and TLoRA training the tiny SD1.5-layout model.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/python bench/profile_train.py [--device cuda] [--dtype bf16]

On a GPU, compare "Self CPU time total" with "Self CUDA time total": a step whose CPU time
is the larger is bound by launching kernels, not by the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {"lora": (1, 8), "tlora": (2, 6)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (or $COMFYUI_PATH)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--size", type=int, default=64, help="latent side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("needs a ComfyUI: --comfyui PATH or COMFYUI_PATH, run with that ComfyUI's Python")
    sys.path.insert(0, str(REPO))
    from tools import comfyui_host as comfyhost
    from tools.tiny_checkpoints import write_tiny_sd15

    comfyhost.import_host(Path(args.comfyui), cpu=args.device == "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="tlora-profile-"))
    comfyhost.use_dirs(tmp / "run", tmp / "models")
    comfyhost.load_pack()
    import comfy.sd
    import torch
    from torch.profiler import ProfilerActivity, profile

    checkpoint = write_tiny_sd15(tmp / "tiny_sd15.safetensors", args.comfyui)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False)
    (positive,) = __import__("nodes").CLIPTextEncode().encode(clip, "a photo of sks toy")
    latents = {"samples": torch.randn(args.batch, 4, args.size, args.size)}
    glue = sys.modules["comfyui_tlora.nodes.train"]
    options_cls = sys.modules["comfyui_tlora.tlora.options"].TrainingOptions
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for method, (transform_rank, residual_rank) in METHODS.items():
        base = options_cls(
            method=method,
            transform_rank=transform_rank,
            residual_rank=residual_rank,
            batch_size=args.batch,
            training_dtype=args.dtype,
        )

        def train(steps, base=base):
            glue.train(model, latents, base.replace(steps=steps), positive=positive)
            sync()

        train(2)
        start = time.perf_counter()
        train(1)
        one = time.perf_counter() - start
        start = time.perf_counter()
        train(1 + args.steps)
        step = (time.perf_counter() - start - one) / args.steps
        print(f"\n===== {method}: {step * 1e3:.1f} ms per step ({args.device}, {args.dtype}, batch {args.batch})")
        with profile(activities=activities) as prof:
            train(args.steps)
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))
        if args.device == "cuda":
            print(averages.table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
