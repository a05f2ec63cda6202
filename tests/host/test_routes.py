"""The pack's HTTP route GET /tlora/info on the real server: an adapter file's metadata, clear errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tlora import PRESETS, TLoRA
from tlora.format import describe, load_adapter_file, save_adapters

SUB = "test_routes"
MODULES = {
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768),
}


def write_adapter(path: Path, method: str = "tlora", steps: int = 7) -> Path:
    """A small adapter file with the metadata Train TLoRA writes."""
    adapters = {module: TLoRA(shape, PRESETS[method]) for module, shape in MODULES.items()}
    metadata = {
        "tlora.method": method,
        "tlora.base_model": "SD15",
        "tlora.steps": str(steps),
        "tlora.targets": json.dumps(["attention"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_adapters(path, adapters, metadata, overwrite=True)


def get(server, route: str, name: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, errors included."""
    query = "" if name is None else "?" + urllib.parse.urlencode({"name": name})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(server.url + route + query, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def files(comfy_server) -> dict[str, str]:
    loras = comfy_server.loras_dir / SUB
    write_adapter(loras / "tlora.safetensors")
    write_adapter(loras / "lora.safetensors", method="lora", steps=3)
    safetensors.torch.save_file({"some.weight": torch.zeros(2)}, str(loras / "not_an_adapter.safetensors"))
    (loras / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    return {p.stem: f"{SUB}/{p.name}" for p in loras.iterdir()}


@pytest.mark.parametrize("route", ["/tlora/info", "/api/tlora/info"])
def test_info_describes_the_file(comfy_server, files, route):
    status, body = get(comfy_server, route, files["tlora"])
    assert status == 200
    expected = describe(load_adapter_file(comfy_server.loras_dir / files["tlora"]))
    assert body == json.loads(json.dumps(expected))
    assert body["method"] == "tlora" and body["base_model"] == "SD15" and body["steps"] == "7"
    assert body["targets"] == ["attention"] and body["modules"] == 2 and body["parameters"] > 0


def test_info_of_a_lora_file(comfy_server, files):
    status, body = get(comfy_server, "/tlora/info", files["lora"])
    assert status == 200 and body["method"] == "lora" and body["steps"] == "3"


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        (None, 400, "no adapter file named"),
        ("", 400, "no adapter file named"),
        ("missing.safetensors", 404, "missing.safetensors is not in ComfyUI's loras folders"),
        (f"../{SUB}/tlora.safetensors", 404, "is not in ComfyUI's loras folders"),
        ("/etc/passwd", 404, "is not in ComfyUI's loras folders"),
    ],
)
def test_info_refuses_names_outside_the_loras_folders(comfy_server, files, name, status, message):
    got, body = get(comfy_server, "/tlora/info", name)
    assert got == status and message in body["error"]


@pytest.mark.parametrize("stem", ["not_an_adapter", "garbage"])
def test_info_names_what_is_wrong_with_a_file(comfy_server, files, stem):
    status, body = get(comfy_server, "/tlora/info", files[stem])
    assert status == 422 and body["error"].startswith(f"{stem}.safetensors")
    status, _ = get(comfy_server, "/tlora/info", files["tlora"])
    assert status == 200  # the server goes on
