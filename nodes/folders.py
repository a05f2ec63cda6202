"""Where the pack's files live in ComfyUI: adapter files in the loras folders (and
``models/tlora``, listed with them), and the node categories."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from ..tlora.options import output_name_problem

LORA_FOLDER = "loras"
LOADER_CATEGORY = "loaders/tlora"
TRAINING_CATEGORY = "training/tlora"


def adapter_files() -> list[str]:
    return folder_paths.get_filename_list(LORA_FOLDER)


def adapter_file_problem(name: str) -> str | None:
    """Why ``name`` is not an adapter file of the loras folders, or None: a node's
    ``validate_inputs`` answer, so the server refuses the prompt with this message."""
    if name in adapter_files():
        return None
    folders = ", ".join(folder_paths.get_folder_paths(LORA_FOLDER))
    return (
        f"adapter file {name!r} is not in ComfyUI's loras folders ({folders}); put it there or pick one from the list"
    )


def resolve_adapter_path(name: str) -> Path:
    """The full path of an adapter file chosen by name, or a clear error."""
    problem = adapter_file_problem(name)
    if problem:
        raise ValueError(problem)
    return Path(folder_paths.get_full_path_or_raise(LORA_FOLDER, name))


def output_problem(name: str) -> str | None:
    """Why ``name`` cannot be saved in the loras folder, or None: the core's file-name rules
    (``tlora.options.output_name_problem``) and a plain relative name (no absolute path, no '..')."""
    problem = output_name_problem(name)
    if problem:
        return problem
    name = name.strip()
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return f"output_name {name!r} must be a plain name inside the loras folder (no absolute path, no '..')"
    return None


def output_path(name: str) -> Path:
    """Where an output name is saved: inside the first loras folder, ``.safetensors`` added."""
    problem = output_problem(name)
    if problem:
        raise ValueError(problem)
    name = name.strip()
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return Path(folder_paths.get_folder_paths(LORA_FOLDER)[0]) / name
