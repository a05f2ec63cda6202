"""The pack's HTTP route for its web extension: ``GET /tlora/info?name=<file>`` (also under ``/api``).

Answers JSON: :func:`tlora.format.describe` of an adapter file in the loras folders (method, parameters,
targets, base model, steps, ...), or ``{"error": why}`` with 400 (no name), 404 (not in the loras folders)
or 422 (not a valid adapter file, with the validator's message). Never raises into the server.

The file is checked without loading it (:func:`tlora.format.inspect_adapter_file`: the header, then its
tensors streamed through the checksum a MB at a time), and at most ``MAX_CONCURRENT`` requests read files
at once (the others wait their turn), so the route's memory stays bounded whatever the files' sizes.
"""

from __future__ import annotations

import asyncio
import logging

import folder_paths
from aiohttp import web

from ..tlora.format import AdapterFileError, describe, inspect_adapter_file
from .folders import LORA_FOLDER, adapter_files

log = logging.getLogger("comfyui-tlora")
INFO_ROUTE = "/tlora/info"
MAX_CONCURRENT = 2
_readers = asyncio.Semaphore(MAX_CONCURRENT)


def adapter_info(name: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) for the adapter file ``name`` of the loras folders."""
    if not name:
        return 400, {"error": "no adapter file named: pass ?name=<file in the loras folders>"}
    if name not in adapter_files():
        return 404, {"error": f"{name} is not in ComfyUI's loras folders"}
    path = folder_paths.get_full_path(LORA_FOLDER, name)
    try:
        return 200, describe(inspect_adapter_file(path))
    except AdapterFileError as err:
        return 422, {"error": str(err)}
    except Exception as err:  # a broken file must not take the route down
        log.exception("%s %s", INFO_ROUTE, name)
        return 500, {"error": f"{name}: {type(err).__name__}: {err}"}


async def get_info(request: web.Request) -> web.Response:
    async with _readers:
        status, body = await asyncio.to_thread(adapter_info, request.query.get("name", ""))
    return web.json_response(body, status=status)


def register() -> bool:
    """Add the route to the running ComfyUI server; False (nothing done) without one."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    instance.routes.get(INFO_ROUTE)(get_info)
    return True
