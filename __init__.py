"""comfyui-tlora: ComfyUI entry point.

Inside ComfyUI this exposes the V3 extension (``comfy_entrypoint``) and the web extension
folder. Outside ComfyUI (tests, scripts, ``python -m tlora``) it imports nothing from the host
and registers nothing: the core lives in ``tlora/`` and never needs ComfyUI.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    WEB_DIRECTORY = "./web"
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
