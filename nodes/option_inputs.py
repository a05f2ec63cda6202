"""Train TLoRA's widgets, generated from :class:`tlora.options.TrainingOptions` (kind, default,
bounds, tooltip), in the dataclass's field order (the order shared workflows store widgets in)."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..tlora.options import TrainingOptions
from .folders import adapter_files

RESUME_NONE = "(none)"  # the node's resume_from choice for "start fresh"


def option_input(f: dataclasses.Field) -> io.Input:
    """The node input of one training option (widget kind, default, bounds, tooltip)."""
    meta = f.metadata
    common = {"tooltip": meta["help"] or None, "optional": meta["optional"]}
    if f.name == "resume_from":
        return io.Combo.Input(f.name, options=[RESUME_NONE, *adapter_files()], default=RESUME_NONE, **common)
    if meta["choices"]:
        return io.Combo.Input(f.name, options=list(meta["choices"]), default=f.default, **common)
    if f.type == "bool":
        return io.Boolean.Input(f.name, default=f.default, **common)
    if f.type == "int":
        extra = {"control_after_generate": True} if f.name == "seed" else {}
        return io.Int.Input(f.name, default=f.default, min=meta["min"], max=meta["max"], **extra, **common)
    if f.type == "float":
        return io.Float.Input(f.name, default=f.default, min=meta["min"], max=meta["max"], step=meta["step"], **common)
    return io.String.Input(f.name, default=f.default, **common)


NODE_OPTIONS = [f for f in dataclasses.fields(TrainingOptions) if f.metadata["node"]]
