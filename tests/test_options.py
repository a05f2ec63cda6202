"""The training options, defined once: checked in one place, and the command line generated from them."""

import argparse
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlora.options import TrainingOptions, add_arguments, cli_flag, from_arguments

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(steps=0), "steps must be at least 1, got 0"),
        (dict(learning_rate=0.0), "learning_rate must be at least 1e-07"),
        (dict(batch_size=65), "batch_size must be at most 64"),
        (dict(schedule="linear"), r"schedule must be one of \['constant', 'cosine'\]"),
        (dict(method="dora"), "method must be one of"),
        (dict(training_dtype="fp8"), "training_dtype must be one of"),
        (dict(grad_clip=math.nan), "grad_clip must be a finite number"),
        (dict(targets=" , "), "targets names no layer group"),
        (dict(output_name="a\0b"), r"output_name 'a\\x00b' contains a control character"),
        (dict(output_name="run\n"), "contains a control character"),
        (dict(output_name="  "), "output_name is empty"),
        (dict(output_name="tlora/"), "names a folder"),
        (dict(output_name="x" * 190), "file name is 202 bytes long: at most 200"),
        (dict(compile_adapters=True, batched_factors=False), "cannot go with batched_factors=False"),
    ],
)
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainingOptions(**bad)


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError, match=r"steps must be at least 1.*batch_size must be at least 1"):
        TrainingOptions(steps=0, batch_size=0)


def test_free_targets_are_split():
    assert TrainingOptions(targets="attention, proj").target_groups == ("attention", "proj")


def test_batched_pass_on_cuda_or_when_compiled_unless_set():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not TrainingOptions().batched_on(cpu) and TrainingOptions().batched_on(cuda)
    assert TrainingOptions(compile_adapters=True).batched_on(cpu)
    assert not TrainingOptions(batched_factors=False).batched_on(cuda)
    assert TrainingOptions(batched_factors=True).batched_on(cpu)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_command_line_defaults_are_the_dataclass_defaults():
    args = parser().parse_args(["--output", "a.safetensors"])
    assert from_arguments(args) == TrainingOptions(output_name="a.safetensors")


def test_every_option_reaches_the_command_line():
    changed = {
        "method": "soda",
        "transform_rank": 3,
        "residual_rank": 5,
        "steps": 7,
        "learning_rate": 0.002,
        "batch_size": 2,
        "seed": 9,
        "output_name": "x.safetensors",
        "targets": "attention,proj",
        "regularizer": "identity",
        "regularizer_weight": 0.5,
        "rotation_learning_rate": 0.001,
        "schedule": "cosine",
        "warmup_steps": 3,
        "grad_accumulation": 2,
        "grad_clip": 0.5,
        "gradient_checkpointing": True,
        "training_dtype": "bf16",
        "loss": "dco",
        "dco_beta": 10.0,
        "save_every": 4,
        "resume_from": "old.safetensors",
        "overwrite": True,
        "preview_every": 5,
        "weight_decay": 0.01,
        "resume_adapter_only": True,
        "bypass_mode": True,
        "max_weight_memory": 2.5,
        "compile_adapters": True,
    }
    on_cli = [f for f in dataclasses.fields(TrainingOptions) if f.metadata["cli"] != ""]
    assert sorted(changed) == sorted(f.name for f in on_cli)  # a new option must be added here too
    argv = []
    for f in on_cli:
        value = changed[f.name]
        argv += [cli_flag(f)] if value is True else [cli_flag(f), str(value)]
    assert from_arguments(parser().parse_args(argv)) == TrainingOptions(**changed)


def test_train_help_lists_every_option_without_comfyui():
    out = subprocess.run(
        [sys.executable, "-m", "tlora", "train", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for f in dataclasses.fields(TrainingOptions):
        if f.metadata["cli"] != "":
            assert cli_flag(f) in out.stdout, f.name
    assert "--comfyui" in out.stdout and "--images" in out.stdout


def test_bad_option_is_refused_before_comfyui_is_needed(tmp_path):
    argv = ["train", "--comfyui", str(tmp_path), "--checkpoint", "c", "--images", "i", "--output", "o", "--steps", "0"]
    out = subprocess.run(
        [sys.executable, "-m", "tlora", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "steps must be at least 1" in out.stderr
