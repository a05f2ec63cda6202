"""Fixtures for tests against a real ComfyUI host.

The host is ``$COMFYUI_PATH`` or the ComfyUI this repo sits in (``ComfyUI/custom_nodes/<pack>``); run with
the host's Python. Without one every test here is skipped (and the summary says so). Fixtures, all
session-scoped:

* ``comfy_host``: ``.path``, ``.version`` once ComfyUI's core imported with this Python (else: skip).
* ``comfy``: ComfyUI imported in-process on CPU with this pack imported once as ``comfyui_tlora``;
  ``comfy.pack``, ``comfy.version``, ``comfy.path``, ``comfy.dirs`` (tmp input/output/temp/checkpoints/loras).
* ``tiny_checkpoint``: Path of a tiny SD1.5-layout checkpoint in ``comfy.dirs.checkpoints``.
* ``tiny_sd15``: ``.model``, ``.clip``, ``.vae`` loaded from it in-process.
* ``comfy_server``: the real server (``server.ComfyServer``) with only this pack as custom nodes;
  its checkpoints/loras folders are ``comfy.dirs.checkpoints``/``comfy.dirs.loras``.

In-process, the pack's own core is ``comfyui_tlora.tlora`` (the classes it registers with ComfyUI); a plain
``import tlora`` is a second copy of the same code with distinct classes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import comfyui_host as comfyhost

HERE = Path(__file__).parent
TINY_CHECKPOINT = "tiny_sd15.safetensors"

_host_path, _no_host_reason = comfyhost.find_comfyui()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.host)
            if _host_path is None:
                item.add_marker(pytest.mark.skip(reason=_no_host_reason))


@pytest.fixture(scope="session")
def comfy_host() -> SimpleNamespace:
    """ComfyUI's core imported with this Python (CPU); skips with the import error if that fails."""
    if _host_path is None:
        pytest.skip(_no_host_reason)
    try:
        version = comfyhost.import_host(_host_path)
    except Exception as e:  # missing deps, wrong Python, broken checkout
        pytest.skip(f"ComfyUI host at {_host_path} cannot be imported with {sys.executable}: {e!r}")
    return SimpleNamespace(path=_host_path, version=version)


@pytest.fixture(autouse=True)
def _require_host(comfy_host):
    """Every host test needs an importable host, including those that only talk to the server."""


@pytest.fixture(scope="session")
def host_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfyui")


@pytest.fixture(scope="session")
def comfy(comfy_host, host_tmp) -> SimpleNamespace:
    dirs = comfyhost.use_dirs(host_tmp / "inproc", host_tmp / "models")
    pack = comfyhost.load_pack()
    return SimpleNamespace(path=comfy_host.path, version=comfy_host.version, pack=pack, dirs=dirs)


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy) -> Path:
    from tools.tiny_checkpoints import write_tiny_sd15

    path = comfy.dirs.checkpoints / TINY_CHECKPOINT
    if not path.exists():
        write_tiny_sd15(path.with_suffix(".partial"), comfy.path).rename(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd15(tiny_checkpoint) -> SimpleNamespace:
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    return SimpleNamespace(model=model, clip=clip, vae=vae)


@pytest.fixture(scope="session")
def comfy_server(request, comfy, host_tmp):
    from .server import ComfyServer

    server = ComfyServer(comfy.path, comfyhost.REPO_ROOT, host_tmp / "server", host_tmp / "models")
    server.launch()
    try:
        request.getfixturevalue("tiny_checkpoint")  # built while the server boots
        server.wait_ready()
        yield server
    finally:
        server.stop()
