"""Waiting on a subprocess (ComfyUI, Chromium): poll until ready, fail fast if it died, never wait forever;
stop it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    probe: Callable[[], T],
    *,
    proc: subprocess.Popen | None,
    timeout: float,
    interval: float,
    died: Callable[[], Exception],
    timed_out: Callable[[], Exception],
) -> T:
    """``probe()`` every ``interval`` s until it returns something truthy, which is returned. Raises ``died()``
    once ``proc`` (None: never started) has exited, ``timed_out()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if proc is None or proc.poll() is not None:
            raise died()
        if time.monotonic() > deadline:
            raise timed_out()
        time.sleep(interval)


def stop_process(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """Terminate ``proc`` if it still runs; kill it if it has not exited ``timeout`` s later."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
