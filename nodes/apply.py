"""Apply TLoRA and TLoRA Info: use an adapter file on a model, or read what one is.

Applying goes through ComfyUI's own LoRA machinery (``comfy.sd.load_lora_for_models``, with
this pack's adapters registered in ``comfy.weight_adapter``), so the result is exactly what the
stock Load LoRA node gives; this node adds the checks a user needs before that: the file is
readable, every module in it matches a layer of this model, every shape fits, and (SODA) every
layer was trained on this model's own weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import comfy.lora
import comfy.sd
from comfy_api.latest import io, ui

from ..tlora.adapters import SODA
from ..tlora.fingerprint import fingerprint
from ..tlora.format import AdapterFile, build_adapter, describe, inspect_adapter_file, load_adapter_file
from .folders import LOADER_CATEGORY, adapter_file_problem, adapter_files, resolve_adapter_path

log = logging.getLogger("comfyui-tlora")
ON_FINGERPRINT_MISMATCH = ["refuse", "warn"]
FINGERPRINT_ADVICE = (
    "Load the checkpoint it was trained on, or set on_fingerprint_mismatch to 'warn' to apply it anyway."
)


def architecture_of(model) -> str:
    """ComfyUI's name for a loaded model's family (e.g. ``SD15``, ``SDXL``)."""
    return type(model.model.model_config).__name__


def architecture_names(model) -> list[str]:
    """The model's config class name and its parents' (``FluxSchnell``, ``Flux``, …): what
    :mod:`tlora.targets` resolves layer groups with."""
    return [cls.__name__ for cls in type(model.model.model_config).__mro__]


@dataclass
class FitReport:
    """How an adapter file's modules map onto a model."""

    matched: dict[str, str]  # file module → model state key
    unmatched: list[str]
    misfit: dict[str, str]  # file module → why its tensors do not fit
    skipped_text_encoder: list[str]
    soda_checked: int = 0  # matched SODA modules whose base fingerprint was compared
    fingerprint_mismatch: list[str] = field(default_factory=list)  # … and differs from this model's weight

    def problems(self, file: AdapterFile, architecture: str) -> str | None:
        total = len(file.modules) - len(self.skipped_text_encoder)
        made_for = file.metadata.get("tlora.base_model", "an unrecorded model")
        where = f"It was made for {made_for}; this model is {architecture}."
        if self.unmatched:
            return (
                f"{file.path.name}: {len(self.matched)} of {total} modules match a layer of this model "
                f"(no layer for e.g. {', '.join(self.unmatched[:3])}). {where} "
                "Use an adapter trained on this model family."
            )
        if self.misfit:
            module, why = next(iter(self.misfit.items()))
            return (
                f"{file.path.name}: {len(self.misfit)} of {total} modules do not fit this model's weights "
                f"(e.g. {module}: {why}). {where} Use an adapter trained on this model family."
            )
        return None

    def fingerprint_problem(self, file: AdapterFile, architecture: str) -> str | None:
        if not self.fingerprint_mismatch:
            return None
        made_for = file.metadata.get("tlora.base_model", "an unrecorded model")
        return (
            f"{file.path.name}: {len(self.fingerprint_mismatch)} of {self.soda_checked} SODA layers were trained on "
            f"different base weights than this model's (e.g. {self.fingerprint_mismatch[0]}; made for {made_for}, "
            f"this model is {architecture}). SODA rebuilds its SVD from the base weights, so on another checkpoint "
            "it does not do what it learned."
        )


def original_weight(patcher, key: str, current):
    """The model's own weight for ``key``: while a patched clone is loaded, ComfyUI keeps the
    original in the patcher's (clone-shared) backup and the module holds the patched weight."""
    backup = getattr(patcher, "backup", {}).get(key)
    return current if backup is None else backup.weight


def check_fit(file: AdapterFile, model, clip) -> FitReport:
    """Match every module of ``file`` to a weight of ``model`` (and ``clip``) and check that
    its adapter can be rebuilt for that weight's shape."""
    key_map: dict = {}
    weights = {}
    owner = {}  # state key → the ModelPatcher holding it
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
        state = model.model.state_dict()
        weights.update(state)
        owner.update(dict.fromkeys(state, model))
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        state = clip.cond_stage_model.state_dict()
        weights.update(state)
        owner.update(dict.fromkeys(state, clip.patcher))
    report = FitReport({}, [], {}, [])
    for module, group in file.modules.items():
        target = key_map.get(module)
        if isinstance(target, tuple):
            target = target[0]
        if target is None or target not in weights:
            if module.startswith("text_encoders.") and clip is None:
                report.skipped_text_encoder.append(module)
            else:
                report.unmatched.append(module)
            continue
        report.matched[module] = target
        try:
            build_adapter(tuple(weights[target].shape), group)  # checked against the layer before it is built
        except ValueError as err:
            report.misfit[module] = str(err)
            continue
        recorded = int(group[SODA.file_mark]) if SODA.file_mark in group else 0
        if recorded:  # 0: not recorded, nothing to compare
            report.soda_checked += 1
            if fingerprint(original_weight(owner[target], target, weights[target])) != recorded:
                report.fingerprint_mismatch.append(module)
    return report


def apply_adapter_file(
    model, clip, path: Path, strength_model: float, strength_clip: float, on_fingerprint_mismatch: str = "refuse"
):
    """Check ``path`` against the model, then patch through ComfyUI's LoRA loader. A SODA layer
    trained on other base weights refuses (``"refuse"``) or logs a warning (``"warn"``)."""
    if on_fingerprint_mismatch not in ON_FINGERPRINT_MISMATCH:
        raise ValueError(f"on_fingerprint_mismatch: {on_fingerprint_mismatch!r} not in {ON_FINGERPRINT_MISMATCH}")
    file = load_adapter_file(path)
    report = check_fit(file, model, clip)
    problem = report.problems(file, architecture_of(model))
    if problem:
        raise ValueError(problem)
    problem = report.fingerprint_problem(file, architecture_of(model))
    if problem and on_fingerprint_mismatch == "refuse":
        raise ValueError(f"{problem} {FINGERPRINT_ADVICE}")
    if problem:
        log.warning("%s Applying it anyway (on_fingerprint_mismatch='warn').", problem)
    if report.skipped_text_encoder:
        log.warning(
            "%s: %d text-encoder modules not applied (connect a CLIP to apply them)",
            path.name,
            len(report.skipped_text_encoder),
        )
    return comfy.sd.load_lora_for_models(model, clip, file.tensors, strength_model, strength_clip)


class ApplyTLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRAApply",
            display_name="Apply TLoRA",
            category=LOADER_CATEGORY,
            description="Apply a TLoRA, SODA or LoRA adapter file to a model (and its text encoder). "
            "Strength scales the weight change linearly; negative values invert it.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("adapter_name", options=adapter_files(), tooltip="A file in ComfyUI's loras folders."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01),
                io.Clip.Input("clip", optional=True),
                io.Combo.Input(
                    "on_fingerprint_mismatch",
                    options=ON_FINGERPRINT_MISMATCH,
                    default="refuse",
                    optional=True,
                    tooltip="SODA layers trained on other base weights than this model's: refuse to apply, "
                    "or log a warning and apply anyway.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name) -> bool | str:
        return adapter_file_problem(adapter_name) or True

    @classmethod
    def execute(
        cls, model, adapter_name, strength_model, strength_clip, clip=None, on_fingerprint_mismatch="refuse"
    ) -> io.NodeOutput:
        path = resolve_adapter_path(adapter_name)
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip)
        new_model, new_clip = apply_adapter_file(
            model, clip, path, strength_model, strength_clip, on_fingerprint_mismatch
        )
        return io.NodeOutput(new_model, new_clip)


def describe_text(info: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in info.items() if v is not None)


class TLoRAInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRAInfo",
            display_name="TLoRA Info",
            category=LOADER_CATEGORY,
            description="Show what an adapter file is: method, parameters, target layers, base model, steps.",
            inputs=[io.Combo.Input("adapter_name", options=adapter_files())],
            outputs=[io.String.Output(display_name="info")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, adapter_name) -> bool | str:
        return adapter_file_problem(adapter_name) or True

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        info = describe(inspect_adapter_file(resolve_adapter_path(adapter_name)))
        text = describe_text(info)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [ApplyTLoRA, TLoRAInfo]
