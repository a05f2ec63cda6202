"""Headless Chromium driven over the Chrome DevTools Protocol (a websocket, through aiohttp, which ComfyUI
ships), for the browser tests and ``docs/screenshots.py``.

Chromium is ``$CHROMIUM`` or ``chromium`` on PATH. It runs with its own profile in a temp dir and
``--headless=new --no-sandbox --disable-gpu``; the calls here are synchronous (an event loop runs in a
thread) and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .waiting import poll_until, stop_process

NO_CHROMIUM_REASON = "no Chromium: set CHROMIUM=/path/to/chromium or put chromium on PATH"


class BrowserError(RuntimeError):
    """Chromium did not start, a CDP call failed, or a wait timed out."""


def find_chromium(env: dict | None = None) -> tuple[str | None, str]:
    """(executable, "") or (None, why not): ``$CHROMIUM``, else ``chromium`` on PATH."""
    env = os.environ if env is None else env
    if env.get("CHROMIUM"):
        path = shutil.which(env["CHROMIUM"])
        return (path, "") if path else (None, f"no Chromium: CHROMIUM={env['CHROMIUM']} is not an executable")
    path = shutil.which("chromium", path=env.get("PATH"))
    return (path, "") if path else (None, NO_CHROMIUM_REASON)


class Browser:
    """One Chromium with one page; ``evaluate`` runs JavaScript in it, ``console`` collects what it logged."""

    def __init__(self, executable: str, width: int = 1600, height: int = 900, timeout: float = 60.0):
        self.executable, self.width, self.height, self.timeout = executable, width, height, timeout
        self.profile = Path(tempfile.mkdtemp(prefix="tlora-chromium-"))
        self.console: list[dict] = []  # {"level", "text", "url"} of console calls, log entries and uncaught errors
        self.proc: subprocess.Popen | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._session = self._ws = self._reader = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> Browser:
        args = [
            self.executable, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
            f"--window-size={self.width},{self.height}", "--hide-scrollbars", "--no-proxy-server",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-dev-shm-usage", "about:blank",
        ]  # fmt: skip
        log = open(self.profile / "chromium.log", "wb")  # noqa: SIM115 (the process owns it)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._thread.start()
        try:
            port = self._devtools_port()
            self._call(self._connect(port))
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
            self.send(
                "Emulation.setDeviceMetricsOverride",
                width=self.width,
                height=self.height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.close()
            raise
        return self

    def _devtools_port(self) -> int:
        marker = self.profile / "DevToolsActivePort"
        text = poll_until(
            lambda: marker.is_file() and marker.read_text().strip(),
            proc=self.proc,
            timeout=self.timeout,
            interval=0.1,
            died=lambda: BrowserError(f"Chromium exited with {self.proc.returncode}\n{self.log_tail()}"),
            timed_out=lambda: BrowserError(
                f"Chromium gave no DevTools port in {self.timeout:.0f} s\n{self.log_tail()}"
            ),
        )
        return int(text.split()[0])

    async def _connect(self, port: int) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(trust_env=False)
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())

    def close(self) -> None:
        if self._thread.is_alive():
            if self._session is not None:
                self._call(self._disconnect(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        proc, self.proc = self.proc, None
        stop_process(proc)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        await self._session.close()

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> str:
        path = self.profile / "chromium.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "--- chromium log tail ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- protocol -------------------------------------------------------------------------------------------

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout or self.timeout)

    async def _read(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._on_event(data.get("method"), data.get("params", {}))
        for future in self._pending.values():
            future.set_exception(BrowserError("the DevTools connection closed"))

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            frame = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            self.console.append({"level": params.get("type"), "text": text, "url": frame[0].get("url", "")})
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = (details.get("exception") or {}).get("description") or details.get("text", "")
            self.console.append({"level": "exception", "text": text, "url": details.get("url", "")})
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            self.console.append({"level": e.get("level"), "text": e.get("text", ""), "url": e.get("url", "")})

    async def _send(self, method: str, params: dict) -> dict:
        self._next_id += 1
        future = self._loop.create_future()
        self._pending[self._next_id] = future
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        return await future

    def send(self, method: str, timeout: float | None = None, **params) -> dict:
        """One CDP command; its result, or BrowserError with the protocol's message."""
        answer = self._call(self._send(method, params), timeout)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')} {answer['error'].get('data', '')}")
        return answer.get("result", {})

    # -- page -----------------------------------------------------------------------------------------------

    def evaluate(self, expression: str, timeout: float | None = None):
        """The JSON value of a JavaScript expression (awaited if it is a promise); raises with the JS error."""
        result = self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            userGesture=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError((details.get("exception") or {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, poll: float = 0.25, what: str | None = None):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        return poll_until(
            lambda: self.evaluate(expression),
            proc=self.proc,
            timeout=timeout,
            interval=poll,
            died=lambda: BrowserError(f"Chromium died while waiting for {what or expression}\n{self.log_tail()}"),
            timed_out=lambda: BrowserError(f"timed out after {timeout:.0f} s waiting for {what or expression}"),
        )

    def goto(self, url: str, timeout: float = 120.0) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout, what=f"{url} to load")

    def screenshot(self, path: Path | None = None, clip: dict | None = None) -> bytes:
        """PNG of the viewport, or of ``clip`` ({x, y, width, height} in CSS pixels); written to ``path`` if given."""
        params = {"format": "png", "captureBeyondViewport": False}
        if clip is not None:
            params["clip"] = {"scale": 1, **clip}
        png = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(png)
        return png
