"""Convert a ComfyUI UI-format workflow (what the editor saves, what templates ship) to the API prompt format.

The UI format keeps widget values as a positional list (``widgets_values``) and connections as ``links``;
POST /prompt wants ``{node_id: {"class_type", "inputs": {name: value | [source_id, slot]}}}``. Widget values
are mapped onto input names in the order the frontend creates widgets from /object_info, which is:

* every widget input (INT, FLOAT, STRING, BOOLEAN, combo, or any ``socketless`` type such as IMAGECOMPARE;
  not ``forceInput``) in ``input_order``, required then optional, including widgets converted to sockets
  (they keep their value; a link overrides it);
* after a seed-like INT (``control_after_generate``, or named seed/noise_seed unless that flag is False)
  one "control_after_generate" value; after a combo with ``control_after_generate`` that value plus a
  "control_filter_list" value;
* after the required inputs, one "upload" value when a required combo has ``image_upload``,
  ``video_upload`` or ``animated_image_upload`` (or ``audio`` has ``audio_upload``).

Frontend-only nodes: Note/MarkdownNote are dropped, Reroute is followed, PrimitiveNode gives its value.
Muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass each input through to the first output
of the same type. Subgraphs and group nodes are not supported (they raise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
IGNORED_NODES = {"Note", "MarkdownNote"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be converted against this server's node definitions."""


def load_workflow(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _spec(spec: Any) -> tuple[str, dict]:
    """(kind, options) of one /object_info input spec; combos come as [[options...], {...}] or ["COMBO", {...}]."""
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return ("COMBO" if isinstance(kind, (list, tuple)) else str(kind)), opts


def widget_slots(info: dict, ui_widget_names: set[str] = frozenset()) -> list[tuple[str, str]]:
    """The node's serialized widgets in frontend order, as (role, input name); role is "value" for the
    input's own value and "control", "filter" or "upload" for the frontend's extra widgets."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {sec: list(inputs.get(sec, {})) for sec in ("required", "optional")}
    slots: list[tuple[str, str]] = []
    for section in ("required", "optional"):
        defs = inputs.get(section, {})
        upload = None
        for name in order.get(section, []):
            if name not in defs:
                continue
            kind, opts = _spec(defs[name])
            widget = kind in WIDGET_KINDS or opts.get("socketless") or name in ui_widget_names
            if opts.get("forceInput") or not widget:
                continue
            slots.append(("value", name))
            control = opts.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed"))
            if control and kind in ("INT", "COMBO"):
                slots.append(("control", name))
                if kind == "COMBO":
                    slots.append(("filter", name))
            is_upload = any(opts.get(f) for f in UPLOAD_FLAGS) or (name == "audio" and opts.get("audio_upload"))
            if section == "required" and kind == "COMBO" and upload is None and is_upload:
                upload = name
        if upload is not None:
            slots.append(("upload", upload))
    return slots


def widget_inputs(node: dict, info: dict, strict: bool = False) -> dict[str, Any]:
    """{input name: value} from the node's widgets_values. Values beyond the known widgets (frontend
    extension widgets, e.g. a 3-D preview) are ignored like the frontend does, or raise when ``strict``."""
    values = node.get("widgets_values")
    ui_names = {i["widget"]["name"] for i in node.get("inputs") or [] if isinstance(i.get("widget"), dict)}
    slots = widget_slots(info, ui_names)
    names = [name for role, name in slots if role == "value"]
    if isinstance(values, dict):  # some nodes save {name: value}
        return {k: v for k, v in values.items() if k in names}
    values = list(values or [])
    if strict and len(values) > len(slots):
        raise WorkflowError(
            f"node {node.get('id')} ({node.get('type')}): {len(values)} widgets_values for {len(slots)} widgets "
            f"{slots}: {values!r}"
        )
    out = {name: value for (role, name), value in zip(slots, values, strict=False) if role == "value"}
    for name in names[len(out) :]:  # an older save with fewer widgets: the frontend would use the defaults
        _, opts = _spec({**info["input"].get("required", {}), **info["input"].get("optional", {})}[name])
        if "default" in opts:
            out[name] = opts["default"]
    return out


def _links(workflow: dict) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id, origin slot, type); links are lists or (newer schema) dicts."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type"))
        else:
            out[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else None)
    return out


def ui_to_api(workflow: dict, object_info: dict, strict: bool = False) -> dict:
    """API prompt for a UI-format workflow, using the server's /object_info to name the widget values.
    ``strict``: every widgets_values entry must belong to a known widget."""
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _links(workflow)
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs", [])}

    def source(link_id: int, seen: frozenset = frozenset()) -> Any:
        """[origin id, slot] of a link after Reroutes and bypasses; ("value", v) from a PrimitiveNode; None."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        origin_id, slot, link_type = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None or origin.get("mode") == MODE_MUTED:
            return None
        seen = seen | {link_id}
        inputs = origin.get("inputs") or []
        if origin["type"] == "Reroute":
            return source(inputs[0].get("link") if inputs else None, seen)
        if origin["type"] == "PrimitiveNode":
            return ("value", (origin.get("widgets_values") or [None])[0])
        if origin.get("mode") == MODE_BYPASSED:
            out_type = link_type or (origin.get("outputs") or [{}])[slot].get("type")
            for inp in inputs:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source(inp["link"], seen)
            return None
        return [str(origin_id), slot]

    prompt = {}
    for node_id, node in nodes.items():
        kind = node.get("type")
        if kind in IGNORED_NODES or kind in ("Reroute", "PrimitiveNode"):
            continue
        if node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        if kind in subgraphs:
            raise WorkflowError(f"node {node_id} is a subgraph ({kind}); subgraphs are not supported")
        if kind not in object_info:
            raise WorkflowError(f"node {node_id}: type {kind!r} is unknown to the server (/object_info)")
        info = object_info[kind]
        inputs = widget_inputs(node, info, strict)
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            name = inp["widget"]["name"] if isinstance(inp.get("widget"), dict) else inp["name"]
            src = source(inp["link"])
            if isinstance(src, tuple):
                inputs[name] = src[1]
            elif src is not None:
                inputs[name] = src
            elif name in inputs and not isinstance(inp.get("widget"), dict):
                del inputs[name]
        title = node.get("title") or info.get("display_name") or kind
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    return prompt
