"""The pack's HTTP route GET /tlora/info on the real server: an adapter file's metadata, clear errors
(a 4xx with the validator's message for hostile files, never a 500), bounded memory on a large file."""

from __future__ import annotations

import json
import math
import time
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


# -- hostile and large files (issue 17): a 4xx with the validator's message, bounded memory --------------------

HOSTILE = "test_routes_hostile"


def raw_safetensors(path: Path, header: bytes, data: bytes = b"\0" * 4) -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def hostile_adapter(path: Path, change) -> None:
    """The small TLoRA file of write_adapter, one tensor changed, saved with a valid checksum."""
    from tlora.format import CHECKSUM_KEY, checksum, load_adapter_file, write_safetensors

    good = load_adapter_file(write_adapter(path))
    tensors, meta = dict(good.tensors), dict(good.metadata)
    change(tensors)
    meta[CHECKSUM_KEY] = checksum(tensors, meta)
    write_safetensors(path, tensors, meta, overwrite=True)


def big_adapter(path: Path, size: int) -> None:
    """A valid file of ``size`` bytes of tensors (one LoRA module and a ``size``-byte stray tensor),
    written and checksummed a MB at a time: never held in memory here either."""
    import hashlib

    from tlora.format import CHECKSUM_KEY

    module = next(iter(MODULES))
    up, down = torch.full((320, 4), 0.01), torch.full((4, 320), 0.01)
    small = {f"{module}.lora_up.weight": up, f"{module}.lora_down.weight": down}
    count = size // 4
    meta = {"tlora.method": "lora", "tlora.steps": "1", "tlora.format_version": "1"}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    names = sorted([*small, "zz.padding"])
    for name in names:
        shape = (count,) if name == "zz.padding" else tuple(small[name].shape)
        digest.update(f"{name}|torch.float32|{shape}|".encode())
        if name != "zz.padding":
            digest.update(small[name].numpy().tobytes())
    chunk = bytes(1 << 20)
    for _ in range(count * 4 // len(chunk)):
        digest.update(chunk)
    header, offset = {"__metadata__": {**meta, CHECKSUM_KEY: digest.hexdigest()}}, 0
    for name in names:
        nbytes = count * 4 if name == "zz.padding" else small[name].numel() * 4
        shape = [count] if name == "zz.padding" else list(small[name].shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in names[:-1]:
            f.write(small[name].numpy().tobytes())
        for _ in range(count * 4 // len(chunk)):
            f.write(chunk)


@pytest.fixture(scope="module")
def hostile_files(comfy_server) -> dict[str, str]:
    folder = comfy_server.loras_dir / HOSTILE
    folder.mkdir(parents=True, exist_ok=True)
    q = next(iter(MODULES))
    raw_safetensors(folder / "list_header.safetensors", b"[1, 2, 3]")
    raw_safetensors(folder / "deep_header.safetensors", b'{"a":' * 100_000 + b"{}" + b"}" * 100_000)
    hostile_adapter(folder / "nan_scale.safetensors", lambda t: t.update({f"{q}.tlora.scale": torch.tensor(math.nan)}))
    hostile_adapter(
        folder / "ring_1500.safetensors", lambda t: t.update({f"{q}.tlora.residual_out.0": torch.zeros(0, 1500, 1500)})
    )
    hostile_adapter(folder / "lora_mid.safetensors", lambda t: t.update({f"{q}.tlora.lora_mid": torch.zeros(3)}))
    return {p.stem: f"{HOSTILE}/{p.name}" for p in folder.iterdir()}


@pytest.mark.parametrize(
    ("stem", "message"),
    [
        ("list_header", "list_header.safetensors is not a readable safetensors file (truncated, corrupt or another "
         "format: header is a JSON list, not an object)"),
        ("deep_header", "header is nested too deeply"),
        ("nan_scale", "nan_scale.safetensors: {q}: tlora.scale holds 1 NaN or infinite value"),
        ("ring_1500", "ring_1500.safetensors: {q}: tlora.residual_out.0 is empty (shape [0, 1500, 1500])"),
        ("lora_mid", "lora_mid.safetensors: {q}: unexpected key tlora.lora_mid"),
    ],
)  # fmt: skip
def test_a_hostile_file_is_a_422_with_its_problem(comfy_server, hostile_files, stem, message):
    status, body = get(comfy_server, "/tlora/info", hostile_files[stem])
    assert status == 422 and message.format(q=next(iter(MODULES))) in body["error"], body


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_growth_mb(pid: int, work) -> tuple[float, object]:
    """(the largest RSS of process ``pid`` during ``work()`` above its RSS before, what work returned),
    sampling /proc every 5 ms."""
    import threading

    before, peak, done = rss_mb(pid), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return peak[0] - before, result


BIG_BYTES = 1 << 30  # 1 GiB of tensors: loading it would add a GiB or more to the server
MAX_ROUTE_GROWTH_MB = 64


def test_a_large_file_is_described_in_bounded_memory(comfy_server):
    """The route reads the header and streams the checksum: the server's memory does not grow with
    the file, for one request or several at once (at most two read files at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    path = comfy_server.loras_dir / HOSTILE / "big.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        big_adapter(path, BIG_BYTES)
    name = f"{HOSTILE}/big.safetensors"
    get(comfy_server, "/tlora/info", name)  # warm: the route's first call imports what it needs
    growth, (status, body) = peak_growth_mb(comfy_server.proc.pid, lambda: get(comfy_server, "/tlora/info", name))
    assert status == 200 and body["method"] == "lora" and body["modules"] == 1, body
    assert growth < MAX_ROUTE_GROWTH_MB, f"the server grew by {growth:.0f} MB on a {BIG_BYTES >> 20} MB file"

    def three_at_once():
        with ThreadPoolExecutor(3) as pool:
            return list(pool.map(lambda _: get(comfy_server, "/tlora/info", name), range(3)))

    growth, answers = peak_growth_mb(comfy_server.proc.pid, three_at_once)
    assert [status for status, _ in answers] == [200, 200, 200]
    assert growth < MAX_ROUTE_GROWTH_MB, f"three requests grew the server by {growth:.0f} MB"
