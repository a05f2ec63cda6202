"""The host-test harness finds (or reports the lack of) a ComfyUI host without importing ComfyUI."""

import subprocess
import sys
from pathlib import Path

from tools.comfyui_host import NO_HOST_REASON, find_comfyui


def fake_comfyui(root):
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    return root


def test_no_host(tmp_path):
    assert find_comfyui(env={}, repo_roots=[tmp_path / "repo"]) == (None, NO_HOST_REASON)
    assert "COMFYUI_PATH" in NO_HOST_REASON


def test_host_from_env(tmp_path):
    host = fake_comfyui(tmp_path / "ComfyUI")
    assert find_comfyui(env={"COMFYUI_PATH": str(host)}, repo_roots=[]) == (host.resolve(), "")
    path, reason = find_comfyui(env={"COMFYUI_PATH": str(tmp_path / "nope")}, repo_roots=[])
    assert path is None and "has no main.py" in reason


def test_host_from_custom_nodes(tmp_path):
    host = fake_comfyui(tmp_path / "ComfyUI")
    repo = host / "custom_nodes" / "comfyui-tlora"
    repo.mkdir(parents=True)
    assert find_comfyui(env={}, repo_roots=[repo]) == (host.resolve(), "")
    assert find_comfyui(env={}, repo_roots=[tmp_path / "custom_nodes" / "x"]) == (None, NO_HOST_REASON)


def test_harness_modules_import_no_comfyui():
    code = (
        "import sys; import tools.comfyui_host, tools.tiny_checkpoints, tests.host.server, tests.host.workflow; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes')]; "
        "assert not bad, bad"
    )
    repo = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=120)


def test_host_loader_is_standard_library_only():
    """tools/comfyui_host.py is what the CLI imports before any host: nothing beyond the standard library."""
    code = (
        "import sys; before = set(sys.modules); import tools.comfyui_host; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before} - {'tools'}; "
        "bad = sorted(m for m in new if m not in sys.stdlib_module_names); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], check=True, timeout=120)
