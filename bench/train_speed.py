"""Training step time and memory on a tiny SD1.5-layout model, side by side in one run:
ComfyUI's own Train LoRA node (LoRA r=8), this pack's LoRA r=8, TLoRA(2,6) and SODA.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/python bench/train_speed.py [--size 32] [--steps 6]

Each trainer runs in its own subprocess (so peak memory is its own): it trains ``warm`` steps,
then ``warm + steps``, and the step time is the difference divided by ``steps`` (set-up cost
cancels). Memory is the peak resident set during training minus the set before it (CPU), or
the CUDA allocator's peak (GPU). Each trainer runs ``--repeats`` times, alternating, and the
medians are reported (a single CPU run's memory moves by tens of MiB). Targets (issue #5):
TLoRA ≤ 1.3× and peak ≤ 1.15× this pack's LoRA; this pack's LoRA no slower than ComfyUI's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ["comfyui-lora-r8", "lora-r8", "tlora-2-6", "soda"]
TARGETS = [("tlora-2-6", "lora-r8", "time", 1.3), ("tlora-2-6", "lora-r8", "memory", 1.15)]
TARGETS += [("lora-r8", "comfyui-lora-r8", "time", 1.0)]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(trainer: str, comfy_path: Path, checkpoint: Path, args: argparse.Namespace) -> dict:
    """Runs in the subprocess: load the host and the model, train twice, report."""
    sys.path.insert(0, str(REPO))
    from tools import comfyui_host as comfyhost

    comfyhost.import_host(comfy_path, cpu=args.device == "cpu")
    comfyhost.use_dirs(Path(os.environ["TLORA_BENCH_TMP"]) / "run", Path(os.environ["TLORA_BENCH_TMP"]) / "models")
    comfyhost.load_pack()
    import comfy.sd
    import torch

    torch.manual_seed(0)
    if args.model == "sdxl":  # a random full-size SDXL UNet; random text embeddings stand in for its CLIPs
        from tools.tiny_checkpoints import build_sdxl_unet

        model = comfy.sd.load_diffusion_model_state_dict(build_sdxl_unet(args.device))
        positive = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    else:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False)
        (positive,) = __import__("nodes").CLIPTextEncode().encode(clip, "a photo of sks toy")
    size, warm, steps, device, dtype = args.size, args.warm, args.steps, args.device, args.dtype
    latents = {"samples": torch.randn(args.batch, 4, size, size)}
    if trainer == "comfyui-lora-r8":
        node = __import__("comfy_extras.nodes_train", fromlist=["TrainLoraNode"]).TrainLoraNode

        def train(n):
            settings = {
                "batch_size": args.batch,
                "steps": n,
                "grad_accumulation_steps": 1,
                "learning_rate": 1e-4,
                "rank": 8,
                "optimizer": "AdamW",
                "loss_function": "MSE",
                "seed": 0,
                "training_dtype": dtype,
                "lora_dtype": "fp32",
                "algorithm": "LoRA",
                "gradient_checkpointing": False,
                "existing_lora": "[None]",
            }
            if hasattr(node, "train"):  # ComfyUI 0.3.x: a V1 node with positional settings
                node().train(model, latents, positive, *settings.values())
                return
            # ComfyUI ≥ 0.4: a V3 node whose inputs are all lists, with more settings
            settings |= {"quantized_backward": False, "checkpoint_depth": 1, "offloading": False}
            settings |= {"bucket_mode": False, "bypass_mode": False}
            inputs = {"model": model, "latents": latents, "positive": positive, **settings}
            node.execute(**{name: [value] for name, value in inputs.items()})

    else:
        glue = sys.modules["comfyui_tlora.nodes.train"]
        options_cls = sys.modules["comfyui_tlora.tlora.options"].TrainingOptions
        method, ranks = {"lora-r8": ("lora", (1, 8)), "tlora-2-6": ("tlora", (2, 6)), "soda": ("soda", (1, 1))}[trainer]

        def train(n):
            options = options_cls(
                method=method,
                transform_rank=ranks[0],
                residual_rank=ranks[1],
                steps=n,
                batch_size=args.batch,
                training_dtype=dtype,
            )
            glue.train(model, latents, options, positive=positive)

    cuda = device == "cuda"
    synchronize = torch.cuda.synchronize if cuda else lambda: None
    train(warm)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = rss_mib()
    start = time.perf_counter()
    train(warm)
    synchronize()
    short = time.perf_counter() - start
    start = time.perf_counter()
    train(warm + steps)
    synchronize()
    long = time.perf_counter() - start
    if cuda:
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"step_s": (long - short) / steps, "memory_mib": memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (or $COMFYUI_PATH)")
    parser.add_argument("--size", type=int, default=32, help="latent side (32 → 256 px images, 1024 tokens)")
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer (median): CPU peak RSS is noisy")
    parser.add_argument("--model", default="tiny-sd15", choices=["tiny-sd15", "sdxl"], help="sdxl: full size, GPU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="training dtype (adapters stay fp32)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("needs a ComfyUI: --comfyui PATH or COMFYUI_PATH, run with that ComfyUI's Python")
    comfy_path = Path(args.comfyui)
    if args.child:
        result = child(args.child, comfy_path, Path(args.checkpoint), args)
        print(json.dumps(result))
        return 0

    tmp = Path(os.environ.setdefault("TLORA_BENCH_TMP", "/tmp/tlora-bench"))
    checkpoint = tmp / "tiny_sd15.safetensors"
    if not checkpoint.exists():
        sys.path.insert(0, str(REPO))
        from tools import comfyui_host as comfyhost
        from tools.tiny_checkpoints import write_tiny_sd15

        comfyhost.import_host(comfy_path)
        write_tiny_sd15(checkpoint.with_suffix(".partial"), comfy_path).rename(checkpoint)
    runs = {trainer: [] for trainer in TRAINERS}
    for _ in range(args.repeats):  # trainers alternate, so load on a shared machine hits them alike
        for trainer in TRAINERS:
            cmd = [sys.executable, __file__, "--child", trainer, "--checkpoint", str(checkpoint)]
            cmd += ["--comfyui", str(comfy_path), "--size", str(args.size), "--batch", str(args.batch)]
            cmd += ["--device", args.device, "--dtype", args.dtype, "--warm", str(args.warm)]
            cmd += ["--steps", str(args.steps), "--model", args.model]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(out.stderr[-3000:])
                return 1
            runs[trainer].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {
        trainer: {key: statistics.median(r[key] for r in rs) for key in ("step_s", "memory_mib")}
        for trainer, rs in runs.items()
    }
    model = "full-size SDXL UNet (random weights)" if args.model == "sdxl" else "tiny SD1.5-layout UNet"
    print(f"{model}, latents {args.size}×{args.size}, batch {args.batch}, {args.dtype}, {args.device}")
    print(f"median of {args.repeats} run(s) per trainer")
    print(f"{'trainer':<18}{'step':>10}{'memory':>12}{'time vs LoRA':>15}{'memory vs LoRA':>16}")
    lora = results["lora-r8"]
    for name, r in results.items():
        print(
            f"{name:<18}{r['step_s'] * 1e3:8.0f}ms{r['memory_mib']:9.0f}MiB"
            f"{r['step_s'] / lora['step_s']:14.2f}×{r['memory_mib'] / lora['memory_mib']:15.2f}×"
        )
    missed = 0
    for name, ref, what, limit in TARGETS:
        key = "step_s" if what == "time" else "memory_mib"
        ratio = results[name][key] / results[ref][key]
        missed += ratio > limit
        print(f"target: {name} {what} ≤ {limit}× {ref}: {ratio:.2f}× {'OK' if ratio <= limit else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
