"""The real ComfyUI server with this pack: startup, /prompt round trips, and UI-workflow conversion."""

import copy
import glob
import importlib.util
import json
import struct
from pathlib import Path

import pytest

from .server import ComfyServerError
from .workflow import WorkflowError, load_workflow, ui_to_api

WORKFLOWS = Path(__file__).parent / "workflows"

TXT2IMG_API = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor lighthouse", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 2,
            "cfg": 7.5,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "tlora_test/tiny", "images": ["8", 0]}},
}


def strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def txt2img() -> dict:
    return load_workflow(WORKFLOWS / "tiny_sd15_txt2img.json")


def test_server_loads_only_this_pack(comfy_server):
    imported = comfy_server.imported_custom_nodes()
    assert len(imported) == 1 and imported[0].endswith(f": {comfy_server.pack_path}"), imported
    assert comfy_server.host == "127.0.0.1"


@pytest.mark.parametrize("tag", ["", "\x1b[32m[INFO]\x1b[0m ", "\x1b[1m\x1b[33m[WARNING]\x1b[0m "])
def test_log_parser_reads_plain_and_tagged_lines(tmp_path, tag):
    """0.3.64 logs plain lines, 0.33 coloured ones with a level tag: both give the same import-times block."""
    from .server import ComfyServer

    server = ComfyServer(tmp_path / "ComfyUI", tmp_path / "pack", tmp_path / "server", tmp_path / "models")
    pack, other = server.pack_path, tmp_path / "ComfyUI" / "custom_nodes" / "other"
    lines = ["Import times for custom nodes:", f"   0.0 seconds: {other}", "", "Import times for custom nodes:"]
    lines += [f"   0.1 seconds (IMPORT FAILED): {other}", f"   0.2 seconds: {pack}", "", "Starting server"]
    server.log_path.parent.mkdir(parents=True)
    server.log_path.write_text("".join(f"{tag}{line}\n" for line in lines))
    assert server.imported_custom_nodes() == [f"   0.1 seconds (IMPORT FAILED): {other}", f"   0.2 seconds: {pack}"]
    server.check_pack_imported()
    server.log_path.write_text(server.log().replace(f"0.2 seconds: {pack}", f"0.2 seconds (IMPORT FAILED): {pack}"))
    with pytest.raises(ComfyServerError, match="did not import cleanly"):
        server.check_pack_imported()


def test_server_nodes_match_in_process(comfy, comfy_server):
    import asyncio

    extension = asyncio.run(comfy.pack.comfy_entrypoint())
    ids = {node.GET_SCHEMA().node_id for node in asyncio.run(extension.get_node_list())}
    module = f"custom_nodes.{comfy_server.pack_dir_name}"
    served = {k for k, v in comfy_server.object_info().items() if v.get("python_module") == module}
    assert served == ids
    assert "KSampler" in comfy_server.object_info() and "TrainLoraNode" in comfy_server.object_info()


def test_ui_workflow_converts(comfy_server, txt2img):
    prompt = ui_to_api(txt2img, comfy_server.object_info(), strict=True)
    assert strip_meta(prompt) == TXT2IMG_API
    assert prompt["6"]["_meta"]["title"] == "Positive" and prompt["8"]["_meta"]["title"] == "VAE Decode"


def test_ui_workflow_variants_convert(comfy_server, txt2img):
    info = comfy_server.object_info()

    # Older saves list only converted widgets among "inputs"; links may be objects.
    old = copy.deepcopy(txt2img)
    for node in old["nodes"]:
        node["inputs"] = [i for i in node["inputs"] if not ("widget" in i and i["link"] is None)]
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    old["links"] = [dict(zip(keys, link, strict=True)) for link in old["links"]]
    assert strip_meta(ui_to_api(old, info, strict=True)) == TXT2IMG_API

    wf = copy.deepcopy(txt2img)
    nodes = {n["id"]: n for n in wf["nodes"]}
    sampler = {i["name"]: i for i in nodes[3]["inputs"]}

    def link(link_id, src, src_slot, dst, dst_slot, kind):
        wf["links"].append([link_id, src, src_slot, dst, dst_slot, kind])

    def add(node_id, kind, widgets=(), inputs=(), mode=0):
        wf["nodes"].append(
            {"id": node_id, "type": kind, "mode": mode, "inputs": list(inputs), "widgets_values": list(widgets)}
        )

    # seed: a widget converted to a socket, fed by a frontend PrimitiveNode (value + control value)
    add(10, "PrimitiveNode", [7, "fixed"])
    link(10, 10, 0, 3, 4, "INT")
    sampler["seed"]["link"] = 10
    # steps: fed by a real node whose INT has control_after_generate
    add(15, "PrimitiveInt", [3, "fixed"], [{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": None}])
    link(15, 15, 0, 3, 5, "INT")
    sampler["steps"]["link"] = 15
    # model through a Reroute; latent through a bypassed node; a muted preview and a note
    add(11, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}])
    wf["links"][0] = [1, 4, 0, 11, 0, "MODEL"]
    link(11, 11, 0, 3, 0, "MODEL")
    sampler["model"]["link"] = 11
    add(12, "LatentUpscaleBy", ["nearest-exact", 1.5], [{"name": "samples", "type": "LATENT", "link": 2}], mode=4)
    wf["links"][1] = [2, 5, 0, 12, 0, "LATENT"]
    link(12, 12, 0, 3, 3, "LATENT")
    sampler["latent_image"]["link"] = 12
    add(13, "PreviewImage", inputs=[{"name": "images", "type": "IMAGE", "link": 13}], mode=2)
    link(13, 8, 0, 13, 0, "IMAGE")
    add(14, "Note", ["just a note"])

    expected = copy.deepcopy(TXT2IMG_API)
    expected["3"]["inputs"].update(seed=7, steps=["15", 0])
    expected["15"] = {"class_type": "PrimitiveInt", "inputs": {"value": 3}}
    assert strip_meta(ui_to_api(wf, info, strict=True)) == expected


def test_ui_workflow_errors(comfy_server, txt2img):
    info = comfy_server.object_info()
    wf = copy.deepcopy(txt2img)
    wf["nodes"][0]["widgets_values"].append("surplus")
    assert ui_to_api(wf, info)["4"]["inputs"] == {"ckpt_name": "tiny_sd15.safetensors"}  # ignored like the frontend
    with pytest.raises(WorkflowError, match="CheckpointLoaderSimple"):
        ui_to_api(wf, info, strict=True)
    wf["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(wf, info)


def installed_templates_dir() -> Path | None:
    """The folder of the host's workflow templates (UI-format JSON): ``templates/`` in the package
    comfyui_workflow_templates, or where that package became a wrapper (ComfyUI 0.33), in
    comfyui_workflow_templates_json. None if neither is installed."""
    for module in ("comfyui_workflow_templates_json", "comfyui_workflow_templates"):
        spec = importlib.util.find_spec(module)
        folder = Path(spec.origin).parent / "templates" if spec and spec.origin else None
        if folder is not None and folder.is_dir():
            return folder
    return None


# V3 inputs that the frontend expands into several ("values" -> "values.a", "values.b"): not converted here.
DYNAMIC_INPUTS = {"COMFY_AUTOGROW_V3", "COMFY_DYNAMICCOMBO_V3", "COMFY_DYNAMICSLOT_V3"}


def uses_dynamic_inputs(node_info: dict) -> bool:
    specs = [*node_info["input"].get("required", {}).values(), *node_info["input"].get("optional", {}).values()]
    return any(
        isinstance(spec, list) and spec and isinstance(spec[0], str) and spec[0] in DYNAMIC_INPUTS for spec in specs
    )


def test_installed_templates_convert(comfy_server):
    """The host's workflow templates (UI format) convert with type-consistent widget values."""
    folder = installed_templates_dir()
    if folder is None:
        pytest.skip("no workflow templates installed (comfyui_workflow_templates[_json])")
    info = comfy_server.object_info()
    checked = 0
    for path in sorted(glob.glob(str(folder / "*.json"))):
        wf = json.loads(Path(path).read_text())
        if "nodes" not in wf or (wf.get("definitions") or {}).get("subgraphs"):
            continue
        types = {n["type"] for n in wf["nodes"]}
        if not types <= set(info) | {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}:
            continue
        if any(uses_dynamic_inputs(info[t]) for t in types & set(info)):
            continue
        for node_id, node in ui_to_api(wf, info).items():
            for name, spec in info[node["class_type"]]["input"].get("required", {}).items():
                value = node["inputs"].get(name)
                assert value is not None, (path, node_id, name)
                kind = "COMBO" if isinstance(spec[0], list) else spec[0]
                if isinstance(value, list) or kind not in ("INT", "FLOAT", "BOOLEAN", "COMBO"):
                    continue
                options = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
                ok = {
                    "INT": isinstance(value, int) and not isinstance(value, bool),
                    "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool),
                    "BOOLEAN": isinstance(value, bool),
                    "COMBO": value in options or "." in str(value),  # file names depend on what is installed
                }[kind]
                assert ok, (Path(path).name, node_id, node["class_type"], name, value)
        checked += 1
    print("CHECKED", checked)
    assert checked >= 1


def test_ui_workflow_runs_to_image(comfy_server, txt2img, tiny_checkpoint):
    prompt = ui_to_api(txt2img, comfy_server.object_info(), strict=True)
    history = comfy_server.run(prompt, timeout=120)
    files = comfy_server.output_files(history)
    assert len(files) == 1 and files[0].is_file()
    assert files[0].parent == comfy_server.output_dir / "tlora_test"
    assert png_size(files[0]) == (64, 64)


def test_queue_refusal_names_the_input(comfy_server):
    prompt = copy.deepcopy(TXT2IMG_API)
    prompt["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    with pytest.raises(ComfyServerError, match="ckpt_name"):
        comfy_server.queue(prompt)


def test_execution_error_names_the_node(comfy_server):
    (comfy_server.input_dir / "not_an_image.png").write_bytes(b"this is not a png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "not_an_image.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(ComfyServerError, match=r"node 1 \(LoadImage\) raised"):
        comfy_server.run(prompt, timeout=60)


def test_broken_pack_fails_server_start(comfy, tmp_path):
    """The server fixture's import check catches a pack that ComfyUI could not import (ComfyUI itself starts)."""
    from .server import ComfyServer

    broken = tmp_path / "pack"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('boom from the broken pack')\n")
    server = ComfyServer(comfy.path, broken, tmp_path / "server", tmp_path / "models")
    with pytest.raises(ComfyServerError, match="did not import cleanly") as err:
        server.start(timeout=120)
    assert "boom from the broken pack" in str(err.value)
    assert server.proc is None
