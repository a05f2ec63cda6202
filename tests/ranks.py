"""What the data-parallel tests need to start a second process: a free localhost port and gloo,
or a skip that says why not."""

import socket

import pytest
import torch


def free_port_or_skip() -> int:
    """A free localhost port for a process group's rendezvous; skips where processes cannot meet."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend: a second rank cannot start, data-parallel tests skipped")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as err:
        pytest.skip(f"a second rank cannot reach this process over localhost ({err}): data-parallel tests skipped")
