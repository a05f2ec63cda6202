"""Run the real ComfyUI server as a subprocess, with only this pack loaded, and talk to it over HTTP."""

from __future__ import annotations

import atexit
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .waiting import poll_until, stop_process

LOOPBACK = "127.0.0.1"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
PACK_DIR_NAME = "comfyui-tlora"
IMPORT_ERRORS = ("Cannot import", "IMPORT FAILED", "Error while calling comfy_entrypoint", "Skip ")
# ComfyUI's model folders the server reads from ``models`` (each a subfolder of the same name).
MODEL_FOLDERS = ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae")
IMPORT_TIMES = "Import times for custom nodes:"
# Newer ComfyUI (0.33; 0.3.64 does not) colours its console lines and tags each with its level:
# "\x1b[32m[INFO]\x1b[0m message".
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
LEVEL_TAG = re.compile(r"^\[(DEBUG|DETAIL|INFO|WARNING|ERROR|CRITICAL)\] ?")


class ComfyServerError(RuntimeError):
    """The server refused a prompt, failed to execute it, or died."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ComfyServer:
    """``main.py --cpu`` on a loopback port; custom nodes limited to this pack (symlinked from a tmp dir).

    Layout under ``base``: ``custom_nodes/<pack>`` -> repo root, ``input/ output/ temp/ user/``,
    ``extra_model_paths.yaml`` and ``server.log``. ``models`` holds one folder per ``MODEL_FOLDERS`` entry.
    """

    def __init__(self, comfy_path: Path, pack_root: Path, base: Path, models: Path, python: str = sys.executable):
        self.comfy_path = Path(comfy_path)
        self.pack_root = Path(pack_root)
        self.base = Path(base)
        self.python = python
        self.host = LOOPBACK
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.input_dir, self.output_dir = self.base / "input", self.base / "output"
        self.temp_root, self.user_dir = self.base / "temp", self.base / "user"
        self.temp_dir = self.temp_root / "temp"  # main.py appends "temp" to --temp-directory
        self.model_dirs = {name: Path(models) / name for name in MODEL_FOLDERS}
        self.checkpoints_dir, self.loras_dir = self.model_dirs["checkpoints"], self.model_dirs["loras"]
        self.log_path = self.base / "server.log"
        self._object_info: dict | None = None

        # If the repo already sits in the host's custom_nodes, whitelist it there instead of adding a second copy.
        own = self.comfy_path / "custom_nodes" / self.pack_root.name
        if own.exists() and own.resolve() == self.pack_root.resolve():
            self.pack_dir_name, self.custom_nodes_dir = self.pack_root.name, None
        else:
            self.pack_dir_name, self.custom_nodes_dir = PACK_DIR_NAME, self.base / "custom_nodes"
            other = self.comfy_path / "custom_nodes" / PACK_DIR_NAME
            if other.exists():
                raise ComfyServerError(f"{other} is not this repo; whitelisting {PACK_DIR_NAME} would load it too")
        self.pack_path = (self.custom_nodes_dir or self.comfy_path / "custom_nodes") / self.pack_dir_name

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------------------------

    def _write_config(self) -> Path:
        for d in (self.input_dir, self.output_dir, self.temp_root, self.user_dir, *self.model_dirs.values()):
            d.mkdir(parents=True, exist_ok=True)
        paths = dict(self.model_dirs)
        if self.custom_nodes_dir is not None:
            self.custom_nodes_dir.mkdir(parents=True, exist_ok=True)
            link = self.custom_nodes_dir / self.pack_dir_name
            if not link.is_symlink():
                link.symlink_to(self.pack_root, target_is_directory=True)
            paths["custom_nodes"] = self.custom_nodes_dir
        # utils/extra_config.py: {section: {folder_name: "path[\npath...]", is_default: bool}}; JSON strings are YAML.
        lines = ["comfyui_tlora_tests:", "  is_default: true"]
        lines += [f"  {name}: {json.dumps(str(p))}" for name, p in paths.items()]
        config = self.base / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def command(self) -> list[str]:
        config = self._write_config()
        return [
            self.python, "main.py", "--cpu",
            "--listen", self.host, "--port", str(self.port),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", self.pack_dir_name,
            "--disable-api-nodes", "--disable-auto-launch",
            "--output-directory", str(self.output_dir),
            "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_root),
            "--user-directory", str(self.user_dir),
            "--database-url", "sqlite:///:memory:",
            "--extra-model-paths-config", str(config),
        ]  # fmt: skip

    def launch(self) -> None:
        """Start the server process (returns at once; see wait_ready)."""
        self.port = free_port(self.host)
        cmd = self.command()
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.comfy_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until /object_info answers, then check that the pack imported cleanly."""

        def object_info() -> dict | None:
            try:
                return self._request("GET", "/object_info", timeout=30)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return None

        def died() -> ComfyServerError:
            code = None if self.proc is None else self.proc.returncode
            return ComfyServerError(f"ComfyUI exited with {code} while starting\n{self.log_tail()}")

        def timed_out() -> ComfyServerError:
            self.stop()
            return ComfyServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s\n{self.log_tail()}")

        self._object_info = poll_until(
            object_info, proc=self.proc, timeout=timeout, interval=0.25, died=died, timed_out=timed_out
        )
        self.check_pack_imported()

    def start(self, timeout: float = 120.0) -> ComfyServer:
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def check_pack_imported(self) -> None:
        """The pack was imported without error: its line is in "Import times for custom nodes", not failed."""
        path = str(self.pack_path)
        bad = [ln for ln in self.log_lines() if path in ln and any(s in ln for s in IMPORT_ERRORS)]
        if bad or not any(ln.endswith(f": {path}") for ln in self.imported_custom_nodes()):
            raise ComfyServerError(f"the pack at {path} did not import cleanly\n{self.log_tail(80)}")

    def imported_custom_nodes(self) -> list[str]:
        """The lines of the log's last "Import times for custom nodes:" block ("   0.1 seconds: <path>")."""
        lines = self.log_lines()
        starts = [i for i, ln in enumerate(lines) if ln.strip() == IMPORT_TIMES]
        block = []
        for ln in lines[starts[-1] + 1 :] if starts else []:
            if not ln.strip():
                break
            block.append(ln)
        return block

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[str]:
        """The log's lines as plain messages: without colour codes or a leading level tag, trailing space stripped."""
        return [LEVEL_TAG.sub("", ANSI_CODE.sub("", ln)).rstrip() for ln in self.log().splitlines()]

    def log_tail(self, lines: int = 40) -> str:
        return "--- server log tail ---\n" + "\n".join(self.log().splitlines()[-lines:])

    # -- HTTP -----------------------------------------------------------------------------------------------

    def _request(self, method: str, route: str, body: dict | None = None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def object_info(self, node_class: str | None = None, refresh: bool = False) -> dict:
        """All node definitions (cached), or one node's definition."""
        if refresh or self._object_info is None:
            self._object_info = self._request("GET", "/object_info")
        return self._object_info if node_class is None else self._object_info[node_class]

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST an API-format prompt; returns its prompt_id. Raises with the validation errors on refusal."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            answer = self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ComfyServerError(f"/prompt refused the prompt ({e.code}): {detail}") from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Block until the prompt finished; returns its history entry. Raises with the node error on failure."""
        entry = poll_until(  # in the history only once finished
            lambda: self._request("GET", f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id),
            proc=self.proc,
            timeout=timeout,
            interval=poll,
            died=lambda: ComfyServerError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}"),
            timed_out=lambda: ComfyServerError(f"prompt {prompt_id} not done after {timeout:.0f} s\n{self.log_tail()}"),
        )
        status = entry.get("status") or {}
        if status.get("status_str") == "error" or status.get("completed") is False:
            raise ComfyServerError(execution_error_text(entry) + "\n" + self.log_tail(20))
        return entry

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """queue() + wait()."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def output_files(self, history: dict) -> list[Path]:
        """Paths of every file (images, ...) the finished prompt reported in its UI outputs."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for node_out in history.get("outputs", {}).values():
            for items in node_out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item and item.get("type", "output") in roots:
                        files.append(roots[item.get("type", "output")] / item.get("subfolder", "") / item["filename"])
        return files


def execution_error_text(entry: dict) -> str:
    status = entry.get("status") or {}
    for event, data in status.get("messages", []):
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            return (
                f"node {data.get('node_id')} ({data.get('node_type')}) raised "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}"
            )
        if event == "execution_interrupted":
            return f"execution interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"prompt failed: status {json.dumps(status)[:2000]}"
