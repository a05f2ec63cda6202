"""The training options, defined once: name, type, default, bounds and help text of each.

The Train TLoRA node's inputs (nodes/train.py) and ``python -m tlora train``'s arguments
(:func:`add_arguments`) are generated from :class:`TrainingOptions`; both build a run from one
instance, validated here. Field order is the node's widget order: shared workflows store widget
values by position, so new options go last.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .adapters import METHODS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_RESUME = ""
MAX_OUTPUT_NAME_BYTES = 200  # + ".tlora-state" + a temporary's ".<8>.tmp" stays within a file system's 255


def option(
    default: Any,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    step: float | None = None,
    choices: tuple | None = None,
    optional: bool = True,
    cli: str | None = None,
    node: bool = True,
):
    """A dataclass field with what the node and the CLI need: bounds and ``choices`` (checked in
    :meth:`TrainingOptions.__post_init__`), ``optional`` (the node input's), ``cli`` (a flag other
    than ``--<name>``; ``""``: not on the command line), ``node`` (False: not a node input)."""
    meta = {"help": help, "min": min, "max": max, "step": step, "choices": choices, "optional": optional}
    return field(default=default, metadata={**meta, "cli": cli, "node": node})


@dataclass(frozen=True)
class TrainingOptions:
    """Everything a training run is asked for (defaults: METHOD.md's reference values)."""

    method: str = option("tlora", "Adapter method.", choices=tuple(METHODS), optional=False)
    transform_rank: int = option(2, "Ring rank of the transform T.", min=1, max=16, optional=False)
    residual_rank: int = option(6, "TR ring rank, or LoRA rank.", min=1, max=256, optional=False)
    steps: int = option(500, "Optimizer steps.", min=1, max=100_000, optional=False)
    learning_rate: float = option(1e-4, "AdamW learning rate.", min=1e-7, max=1.0, step=1e-5, optional=False)
    batch_size: int = option(1, "Images per micro-batch.", min=1, max=64, optional=False)
    seed: int = option(0, "Seed of the init and of every step's noise.", min=0, max=0xFFFFFFFF, optional=False)
    output_name: str = option(
        "tlora/my_adapter",
        "Where the adapter is saved: a name in the loras folder (node), a file path (command line).",
        optional=False,
        cli="--output",
    )
    targets: str = option(
        "attention",
        "Layers to adapt, comma-separated: the model family's groups (attention, the default, everywhere; "
        "also e.g. mlp, self_attention, image_stream; docs/families.md), text_attention (the text encoder's, "
        "needs clip + captions), or layer-name globs like *.attn.qkv.",
    )
    regularizer: str = option(
        "none", "Penalty on T: towards I, or towards orthogonal.", choices=("none", "identity", "orthogonal")
    )
    regularizer_weight: float = option(0.0, "Weight of the regularizer.", min=0.0, max=10.0, step=1e-4)
    rotation_learning_rate: float = option(
        5e-5, "Learning rate of SODA's rotations (StiefelAdam).", min=1e-7, max=1.0, step=1e-5
    )
    schedule: str = option("constant", "Learning-rate schedule after warm-up.", choices=("constant", "cosine"))
    warmup_steps: int = option(0, "Linear warm-up steps.", min=0, max=100_000)
    grad_accumulation: int = option(1, "Micro-batches per optimizer step.", min=1, max=256)
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: off).", min=0.0, max=100.0, step=0.1)
    gradient_checkpointing: bool = option(False, "Recompute block activations in backward (less memory).")
    training_dtype: str = option("fp32", "Autocast dtype of the model (adapters stay fp32).", choices=tuple(DTYPES))
    loss: str = option("mse", "mse, or dco (direct consistency against the base model).", choices=("mse", "dco"))
    dco_beta: float = option(1000.0, "DCO's β.", min=0.0, max=1e5)
    save_every: int = option(0, "Save every N steps (0: only at the end).", min=0, max=100_000)
    resume_from: str = option(
        NO_RESUME, "An adapter file (with its .tlora-state beside it) to continue.", cli="--resume"
    )
    overwrite: bool = option(False, "Replace an existing output file.")
    preview_every: int = option(
        0, "Every N steps, sample one image (first caption, fixed seed) and show it (0: off).", min=0, max=100_000
    )
    weight_decay: float = option(1e-4, "AdamW weight decay.", min=0.0, max=1.0, step=1e-5)
    batched_factors: bool | None = option(
        None, "Build same-shaped layers' factors in one batched pass (None: on CUDA).", cli="", node=False
    )
    resume_adapter_only: bool = option(
        False,
        "Resume from the adapter file alone, with a fresh optimizer, when its .tlora-state is not from the same save.",
    )
    bypass_mode: bool = option(
        False,
        "Run the adapters around the frozen layers' own forward instead of merging them into the weights "
        "(always on for fp8 or quantized base weights, and when weights are offloaded).",
    )
    max_weight_memory: float = option(
        0.0,
        "GiB of model weights kept on the GPU; the rest stays in system memory and is copied in at each use "
        "(slower; for models larger than the GPU). 0: as many as fit beside the run.",
        min=0.0,
        max=4096.0,
        step=0.5,
    )
    compile_adapters: bool = option(
        False,
        "Build the batched factors through torch.compile: fewer GPU kernel launches per step, after a first "
        "step that waits for the compiler (falls back to eager if it fails). Turns the batched pass on.",
        node=False,
    )

    def __post_init__(self):
        problems = []
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                problems.append(f"{f.name} must be one of {list(meta['choices'])}, got {value!r}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    problems.append(f"{f.name} must be a finite number, got {value}")
                elif meta["min"] is not None and value < meta["min"]:
                    problems.append(f"{f.name} must be at least {meta['min']}, got {value}")
                elif meta["max"] is not None and value > meta["max"]:
                    problems.append(f"{f.name} must be at most {meta['max']}, got {value}")
        if self.compile_adapters and self.batched_factors is False:
            problems.append("compile_adapters compiles the batched pass: it cannot go with batched_factors=False")
        if not self.target_groups:
            problems.append("targets names no layer group: give at least one, e.g. 'attention'")
        problems += filter(None, [output_name_problem(self.output_name)])
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def target_groups(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def batched_on(self, device: torch.device) -> bool:
        """Whether forwards build factors per group (:func:`tlora.batched.prepared`): as
        ``batched_factors`` says, else on CUDA or when ``compile_adapters``."""
        if self.batched_factors is not None:
            return self.batched_factors
        return device.type == "cuda" or self.compile_adapters

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.training_dtype]

    @property
    def adapter_options(self) -> dict[str, Any]:
        """What :meth:`tlora.adapters.Adapter.create_train` reads."""
        names = ("transform_rank", "residual_rank", "regularizer", "regularizer_weight")
        return {name: getattr(self, name) for name in names}

    def replace(self, **changes) -> TrainingOptions:
        return dataclasses.replace(self, **changes)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rates at (0-based) ``step``: linear warm-up, then
        constant or cosine decay to 0 at ``steps``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def output_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name the output file (checked before anything loads), or None:
    empty, a control character (NUL…), a folder, or a file name too long for the files saved
    beside it (``.tlora-state``, the temporaries of atomic writes)."""
    if not name.strip():
        return "output_name is empty: give the file a name like 'my_subject_tlora'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"output_name {name!r} contains a control character (NUL, newline, …): use a plain file name"
    if name.endswith(("/", "\\")):
        return f"output_name {name!r} names a folder: add a file name"
    file_name = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    size = len(file_name.encode()) + (0 if file_name.endswith(".safetensors") else len(".safetensors"))
    if size > MAX_OUTPUT_NAME_BYTES:
        return f"output_name's file name is {size} bytes long: at most {MAX_OUTPUT_NAME_BYTES}"
    return None


def cli_flag(f: dataclasses.Field) -> str:
    return f.metadata["cli"] or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument per option (``--learning-rate``, …), with its default, choices and help."""
    group = parser.add_argument_group("training options")
    for f in fields(TrainingOptions):
        if f.metadata["cli"] == "":
            continue
        meta, flag = f.metadata, cli_flag(f)
        bounds = [
            f"≥ {meta['min']:g}" if meta["min"] is not None else "",
            f"≤ {meta['max']:g}" if meta["max"] is not None else "",
        ]
        help_text = f"{meta['help']} {' '.join(b for b in bounds if b)}".strip() + " (default: %(default)s)"
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
        elif f.name == "output_name":
            group.add_argument(flag, dest=f.name, required=True, help=meta["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=meta["choices"], help=help_text)


def from_arguments(args: argparse.Namespace) -> TrainingOptions:
    """The options of a parsed command line (see :func:`add_arguments`)."""
    return TrainingOptions(**{f.name: getattr(args, f.name) for f in fields(TrainingOptions) if hasattr(args, f.name)})
