"""Export TLoRA to LoRA: turn any adapter file into a plain LoRA (or baked weight diffs) for this model.

The base weights come from the MODEL input, matched through ComfyUI's LoRA key map (the originals
while a patched clone is loaded, as Apply TLoRA reads them); the work is the core's
``tlora.export``. The file goes to the first loras folder.
"""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..tlora.export import MODES, export_adapter
from ..tlora.format import AdapterFileError, load_adapter_file
from .apply import (
    CATEGORY,
    LORA_FOLDER,
    adapter_files,
    architecture_of,
    check_fit,
    original_weight,
    resolve_adapter_path,
)


def output_path(name: str) -> Path:
    """``name`` (``.safetensors`` added if missing) in the first loras folder; no absolute paths or ``..``."""
    name = name.strip()
    if not name:
        raise ValueError("output_name is empty: give the exported file a name")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"output_name {name!r} must be a name inside the loras folder (no absolute path, no '..')")
    return Path(folder_paths.get_folder_paths(LORA_FOLDER)[0]) / relative


def model_base_weights(model, file) -> dict:
    """The model's own weight for each UNet module of ``file`` (clear error for modules it lacks)."""
    report = check_fit(file, model, None)
    problem = report.problems(file, architecture_of(model))
    if problem:
        raise ValueError(problem)
    state = model.model.state_dict()
    return {module: original_weight(model, key, state[key]) for module, key in report.matched.items()}


def export_for_model(model, adapter_name: str, rank: int, mode: str, output_name: str, overwrite: bool):
    """Export ``adapter_name`` against ``model``'s weights; returns the core's report."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {list(MODES)}")
    if mode == "lora" and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    path = resolve_adapter_path(adapter_name)
    target = output_path(output_name)
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists: choose another output_name or set overwrite")
    if target.resolve() == path.resolve():
        raise ValueError("output_name is the adapter file itself: choose another name")
    try:
        file = load_adapter_file(path)
    except AdapterFileError as err:
        raise ValueError(str(err)) from None
    weights = model_base_weights(model, file)
    skipped = [m for m in file.modules if m.startswith("text_encoders.")]
    return export_adapter(file, weights, target, int(rank), mode, overwrite=overwrite, allow_missing=skipped)


class ExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRAExportLoRA",
            display_name="Export TLoRA to LoRA",
            category=CATEGORY,
            description="Export a TLoRA, SODA or LoRA adapter file to a plain LoRA at a chosen rank (or to full "
            "weight diffs, 'bake'), using this model's weights; any LoRA loader reads the result.",
            inputs=[
                io.Model.Input("model", tooltip="The model the adapter was made for: its weights define ΔW."),
                io.Combo.Input("adapter_name", options=adapter_files(), tooltip="A file in ComfyUI's loras folders."),
                io.Int.Input(
                    "rank",
                    default=32,
                    min=1,
                    max=4096,
                    tooltip="LoRA rank; at least a layer's smaller side is exact. Ignored for 'bake'.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default="lora",
                    tooltip="lora: low-rank up/down factors; bake: the full weight difference per layer (.diff).",
                ),
                io.String.Input("output_name", default="exported_lora", tooltip="File name in the first loras folder."),
                io.Boolean.Input("overwrite", default=False),
            ],
            outputs=[io.String.Output(display_name="path"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, adapter_name, rank, mode, output_name, overwrite) -> io.NodeOutput:
        report = export_for_model(model, adapter_name, rank, mode, output_name, overwrite)
        text = report.table()
        return io.NodeOutput(str(report.path), text, ui=ui.PreviewText(text))


NODES = [ExportLoRA]
