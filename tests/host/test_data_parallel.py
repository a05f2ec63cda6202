"""``torchrun … -m tlora train`` end to end on CPU (gloo, 2 ranks) against a real ComfyUI, on the tiny
SD1.5 checkpoint: the same adapter as one process, resume, files from rank 0 only, a stop on
one rank stops both and saves, a killed rank ends the run with a clear message. Each rank is a
separate process booting its own ComfyUI, as on a multi-GPU machine."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.ranks import free_port_or_skip
from tools.comfyui_host import REPO_ROOT

from .waiting import poll_until, stop_process

psutil = pytest.importorskip("psutil", reason="psutil (a ComfyUI requirement) finds the ranks to signal")

STEPS_SAID = "images per step = 1 per rank × 2 ranks × 1 micro-batch"
TIMEOUT = 900


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks toy, view {i}")
    return folder


def train_args(comfy, checkpoint, images, output, *more) -> list[str]:
    args = ["-m", "tlora", "train", "--comfyui", str(comfy.path), "--checkpoint", str(checkpoint)]
    args += ["--images", str(images), "--output", str(output), "--seed", "3", "--learning-rate", "1e-3"]
    return [*args, "--dist-timeout", "120", *more]


def torchrun(*args: str, nproc: int = 2, cwd: Path = REPO_ROOT, **popen) -> subprocess.Popen:
    """``torchrun`` (as the module, with this Python) on one machine, or one node of ``--nnodes``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([*launcher, *args], cwd=cwd, env=env, text=True, **popen)


def finished(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run did not end within {timeout} s: {err[-3000:]}")
    return proc.returncode, out, err


def adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    file = importlib.import_module("comfyui_tlora.tlora.format").load_adapter_file(path)
    return load_file(str(path)), file.metadata


def state_losses(path: Path) -> list[float]:
    from safetensors import safe_open

    with safe_open(str(path.with_name(path.name + ".tlora-state")), "pt") as f:
        return json.loads(f.metadata()["losses"])


def log_steps(path: Path) -> list[int]:
    log = path.with_suffix(".loss.csv")
    return [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]] if log.exists() else []


@pytest.fixture(scope="module")
def one_process(comfy, tiny_checkpoint, images, tmp_path_factory) -> Path:
    """The reference: one process, a batch of 2, three steps."""
    output = tmp_path_factory.mktemp("one") / "subject.safetensors"
    cmd = [sys.executable, *train_args(comfy, tiny_checkpoint, images, output, "--steps", "3", "--batch-size", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 2 images per step = 2 per rank × 1 rank × 1 micro-batch" in done.stdout
    assert log_steps(output) == [1, 2, 3]
    return output


def test_two_nodes_then_resumed_on_one_equal_one_process(comfy, tiny_checkpoint, images, one_process, tmp_path):
    """Two machines (``--nnodes 2``, one rank each, own folders) train 2 steps; only rank 0's folder
    gets files. Then two ranks on one machine resume that file to step 3: one process's adapter."""
    port = str(free_port_or_skip())
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for rank, folder in enumerate(nodes):
        folder.mkdir()
        node = ["--nnodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port]
        relative = Path("runs") / "subject.safetensors"  # each machine's own folder
        args = train_args(comfy, tiny_checkpoint, images, relative, "--steps", "2", "--batch-size", "1")
        procs.append(torchrun(*node, *args, nproc=1, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = [finished(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert STEPS_SAID in results[0][1] and "saved" in results[0][1]
    assert results[1][1] == ""  # rank 1 reports nothing
    output = nodes[0] / "runs" / "subject.safetensors"
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "subject.loss.csv",
        "subject.safetensors",
        "subject.safetensors.tlora-state",
    ]
    assert list(nodes[1].iterdir()) == []  # rank 1 wrote nothing
    assert log_steps(output) == [1, 2]
    assert state_losses(output) == pytest.approx(state_losses(one_process)[:2], rel=1e-4)

    resumed = torchrun(
        *train_args(comfy, tiny_checkpoint, images, output, "--steps", "3", "--batch-size", "1", "--resume", output),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    code, out, err = finished(resumed)
    assert code == 0, err[-3000:]
    assert "trained 3 steps" in out and out.count("saved") == 1
    tensors, meta = adapter(output)
    reference, _ = adapter(one_process)
    assert meta["tlora.steps"] == "3" and meta["tlora.interrupted"] == "false"
    assert tensors.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(tensors[key].float(), value.float(), atol=2e-5, rtol=1e-4)
    assert state_losses(output) == pytest.approx(state_losses(one_process), rel=1e-4)
    assert log_steps(output) == [1, 2, 3]


def start_long_run(comfy, tiny_checkpoint, images, output) -> tuple[subprocess.Popen, psutil.Process]:
    """Two ranks on a long run, once rank 0 has logged a step; returns torchrun and rank 1."""
    run = torchrun(
        *train_args(comfy, tiny_checkpoint, images, output, "--steps", "400", "--batch-size", "1", "--save-every", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    poll_until(
        lambda: log_steps(output),
        proc=run,
        timeout=TIMEOUT,
        interval=0.5,
        died=lambda: AssertionError(f"torchrun ended early: {run.communicate()[1][-3000:]}"),
        timed_out=lambda: AssertionError("no step was logged"),
    )
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(run.pid).children()}
    assert set(ranks) == {"0", "1"}
    return run, ranks["1"]


def test_sigterm_on_one_rank_stops_both_and_rank_0_saves(comfy, tiny_checkpoint, images, tmp_path):
    output = tmp_path / "subject.safetensors"
    run, rank1 = start_long_run(comfy, tiny_checkpoint, images, output)
    try:
        rank1.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        code, _, err = finished(run, timeout=300)
    finally:
        stop_process(run)
    assert code != 0 and "stopped: stop asked for on rank 1" in err
    assert time.monotonic() - asked < 120
    _, meta = adapter(output)
    steps = int(meta["tlora.steps"])
    assert meta["tlora.interrupted"] == "true" and 1 <= steps < 400
    assert f"training cancelled at step {steps}; saved to {output}" in err
    assert log_steps(output) == list(range(1, steps + 1))  # one row per step: rank 0 alone logs
    assert len(state_losses(output)) == steps


def test_a_killed_rank_ends_the_run_with_a_clear_message(comfy, tiny_checkpoint, images, tmp_path):
    output = tmp_path / "subject.safetensors"
    run, rank1 = start_long_run(comfy, tiny_checkpoint, images, output)
    try:
        rank1.kill()
        killed = time.monotonic()
        code, _, err = finished(run, timeout=300)
    finally:
        stop_process(run)
    assert code != 0 and "error: rank 0 lost the other ranks" in err, err[-3000:]
    assert time.monotonic() - killed < 120
    _, meta = adapter(output)
    assert meta["tlora.interrupted"] == "true" and int(meta["tlora.steps"]) >= 1  # what was trained is kept
