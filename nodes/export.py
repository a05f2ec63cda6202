"""Export TLoRA to LoRA: turn any adapter file into a plain LoRA (or baked weight diffs) for this model.

The base weights come from the MODEL input, matched through ComfyUI's LoRA key map (the originals
while a patched clone is loaded, as Apply TLoRA reads them); the work is the core's
``tlora.export``. The file goes to the first loras folder.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..tlora.export import MODES, export_adapter
from ..tlora.format import load_adapter_file
from .apply import architecture_of, check_fit, original_weight
from .folders import LOADER_CATEGORY, adapter_file_problem, adapter_files, output_path, resolve_adapter_path


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
    file = load_adapter_file(path)
    weights = model_base_weights(model, file)
    skipped = [m for m in file.modules if m.startswith("text_encoders.")]
    return export_adapter(file, weights, target, int(rank), mode, overwrite=overwrite, allow_missing=skipped)


class ExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRAExportLoRA",
            display_name="Export TLoRA to LoRA",
            category=LOADER_CATEGORY,
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
    def validate_inputs(cls, adapter_name) -> bool | str:
        return adapter_file_problem(adapter_name) or True

    @classmethod
    def execute(cls, model, adapter_name, rank, mode, output_name, overwrite) -> io.NodeOutput:
        report = export_for_model(model, adapter_name, rank, mode, output_name, overwrite)
        text = report.table()
        return io.NodeOutput(str(report.path), text, ui=ui.PreviewText(text))


NODES = [ExportLoRA]
