"""The one host loader: locate a ComfyUI and import it (and this pack) in-process, the way ComfyUI
does. Used by the command line (``python -m tlora train``), the host tests and the benches.

Standard library only: without a host nothing here touches ComfyUI (or torch).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "comfyui_tlora"  # sys.modules name of the in-process import of this repo
NO_HOST_REASON = "no ComfyUI host: set COMFYUI_PATH=/path/to/ComfyUI and run with its Python"


def is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def find_comfyui(env: dict | None = None, repo_roots: list[Path] | None = None) -> tuple[Path | None, str]:
    """(ComfyUI dir, "") or (None, why not): $COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this repo."""
    env = os.environ if env is None else env
    if env.get("COMFYUI_PATH"):
        path = Path(env["COMFYUI_PATH"]).expanduser().resolve()
        if is_comfyui(path):
            return path, ""
        return None, f"no ComfyUI host: COMFYUI_PATH={env['COMFYUI_PATH']} has no main.py and comfy/"
    # The checkout as seen (maybe through a symlink in custom_nodes/) and as resolved.
    for root in repo_roots or [Path(__file__).absolute().parents[1], REPO_ROOT]:
        if root.parent.name == "custom_nodes" and is_comfyui(root.parent.parent):
            return root.parent.parent.resolve(), ""
    return None, NO_HOST_REASON


def import_host(path: Path, cpu: bool = True) -> str:
    """Import ComfyUI's core from ``path`` (on CPU unless ``cpu=False``); returns its version.

    Raises whatever the import raises."""
    path = Path(path)
    sys.dont_write_bytecode = True  # never write __pycache__ into the host's tree
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))  # before the repo root: this pack's nodes/ must not shadow ComfyUI's nodes.py
    try:
        return _import_core(path, cpu)
    except BaseException:
        sys.path.remove(str(path))
        raise


def _import_core(path: Path, cpu: bool) -> str:
    stale = sys.modules.get("nodes")
    if stale is not None and Path(getattr(stale, "__file__", "")).parent != path:
        raise ImportError(f"module 'nodes' was already imported from {stale.__file__}, not from {path}")
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args  # args come from [] when imported as a library

        comfy.cli_args.args.cpu = cpu  # must precede comfy.model_management: no GPU driver needed
    # What the pack and the tests need; `nodes` and `folder_paths` are ComfyUI's top-level modules.
    mods = {
        name: importlib.import_module(name)
        for name in (
            "comfy.model_management",
            "comfy.sd",
            "comfy_api.latest",
            "folder_paths",
            "nodes",
            "comfyui_version",
        )
    }
    for name in ("nodes", "folder_paths"):
        where = Path(mods[name].__file__).resolve().parent
        if where != path.resolve():
            raise ImportError(f"{name!r} resolved to {mods[name].__file__}, not to ComfyUI's in {path}")
    return mods["comfyui_version"].__version__


def load_pack(root: Path = REPO_ROOT, name: str = PACK_MODULE) -> ModuleType:
    """Import the repo as a package, like ComfyUI's loader does; a second call returns the same module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def use_dirs(base: Path, models: Path) -> SimpleNamespace:
    """Point the in-process folder_paths at tmp dirs so nothing is written into the host's tree."""
    import folder_paths

    dirs = SimpleNamespace(
        input=base / "input",
        output=base / "output",
        temp=base / "temp",
        user=base / "user",
        checkpoints=models / "checkpoints",
        loras=models / "loras",
    )
    for d in vars(dirs).values():
        d.mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(dirs.input))
    folder_paths.set_output_directory(str(dirs.output))
    folder_paths.set_temp_directory(str(dirs.temp))
    folder_paths.set_user_directory(str(dirs.user))
    folder_paths.add_model_folder_path("checkpoints", str(dirs.checkpoints), is_default=True)
    folder_paths.add_model_folder_path("loras", str(dirs.loras), is_default=True)
    return dirs


def boot(path: Path, cpu: bool) -> ModuleType:
    """ComfyUI imported from ``path`` and this pack loaded into it; returns the pack. A clear
    ``SystemExit`` when ``path`` is not a ComfyUI folder."""
    if not is_comfyui(Path(path)):
        raise SystemExit(f"{path} is not a ComfyUI folder (no main.py and comfy/): pass --comfyui PATH")
    import_host(Path(path), cpu=cpu)
    return load_pack()
