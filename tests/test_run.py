"""A run's files (issue 17): only finite weights are ever saved, the "last good save" is good, an
adapter and its optimizer state resume only as a pair from one save (a kill -9 anywhere in a save
is survived), stale temporaries are cleaned, and a batch larger than the dataset is clamped.

The kill test runs this file as a child process (``python tests/test_run.py <folder> <point>``)
that trains, saves, and stops dead at one point of its next save until it is killed."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tlora import TLoRA, preset  # noqa: E402
from tlora.model import attached  # noqa: E402
from tlora.options import TrainingOptions  # noqa: E402
from tlora.run import RunFiles, fit_batch, resume, state_path, training_metadata  # noqa: E402
from tlora.train import NonFiniteLossError, NonFiniteWeightsError, Trainer, step_generator  # noqa: E402
from tlora.validate import AdapterFileError  # noqa: E402

STEPS = 4
DATA = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
TARGET = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
KILL_POINTS = {  # where the second save stops dead → the steps of the adapter file and of its state left
    "adapter_written": ("1", "1"),  # the adapter's temporary written, not renamed: the old pair, a stray .tmp
    "between_renames": ("2", "1"),  # the adapter renamed, the state not yet written
    "state_written": ("2", "1"),  # the state's temporary written, not renamed: and a stray .tmp
    "after_both": ("2", "2"),  # both renamed: a consistent pair
}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.to_q, self.to_out = nn.Linear(16, 16), nn.Linear(16, 8)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) / 4
        self.requires_grad_(False)

    def forward(self, x):
        return self.to_out(torch.tanh(self.to_q(x)))


def setup(**options):
    """A toy model with TLoRA adapters attached, its trainer, and its micro-batch loss."""
    torch.set_num_threads(1)
    model = Toy()
    modules = {"to_q": model.to_q, "to_out": model.to_out}
    adapters = {n: TLoRA(m.weight.shape, preset("tlora", residual_rank=4)) for n, m in modules.items()}
    attached(modules, adapters).__enter__()  # the toy keeps its adapters for good
    config = TrainingOptions(**{"steps": STEPS, "learning_rate": 3e-2, "residual_rank": 4, "save_every": 1, **options})
    trainer = Trainer(adapters, config)

    def loss(step, micro):
        idx = torch.randperm(len(DATA), generator=step_generator(7, step, micro))[:4]
        return (model(DATA[idx]) - TARGET[idx]).pow(2).mean()

    return adapters, trainer, loss


def run_files(path: Path | None, adapters, trainer) -> RunFiles:
    return RunFiles(trainer, adapters, training_metadata(trainer.config, adapters, "Toy", "toy"), path)


def train(files: RunFiles, loss, until: int = STEPS) -> None:
    """What the node's loop does: a step, a save when due; the end saves; a NaN stops the run."""
    trainer = files.trainer
    try:
        while trainer.step < until:
            trainer.train_step(loss)
            if files.save_due() and trainer.step < until:
                files.save()
        files.save()
    except NonFiniteLossError as err:
        raise ValueError(files.stopped_message(err)) from None


def weights(adapters) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, a in adapters.items() for k, v in a.state_dict().items()}


def straight_run() -> dict[str, torch.Tensor]:
    adapters, trainer, loss = setup()
    train(run_files(None, adapters, trainer), loss)
    return weights(adapters)


# -- only finite weights are saved ----------------------------------------------------------------------


def test_a_nan_update_stops_before_any_save_and_names_the_good_one(tmp_path):
    """The report's case: the loss stayed finite while an update turned the weights to NaN; the
    file save_every then wrote was called "the last good save"."""
    adapters, trainer, loss = setup(steps=10)
    first = trainer.parameters()[0]
    first.register_hook(lambda g: g * float("nan") if trainer.step + 1 == 3 else g)  # step 3's update only
    path = tmp_path / "run.safetensors"
    with pytest.raises(ValueError, match=r"update of step 3 made the adapter weights NaN or infinite.*") as err:
        train(run_files(path, adapters, trainer), loss)
    assert "the last good save is run.safetensors (step 2)" in str(err.value)
    assert all(map(math.isfinite, trainer.losses)) and len(trainer.losses) == 2  # the loss never was NaN
    from tlora.format import load_adapter_file

    saved = load_adapter_file(path)  # refuses NaN: the file on disk is good
    assert saved.metadata["tlora.steps"] == "2"


def test_a_nan_update_before_any_save_says_none_is_good(tmp_path):
    adapters, trainer, loss = setup(steps=10, save_every=0)
    trainer.parameters()[0].register_hook(lambda g: g * float("inf"))
    with pytest.raises(ValueError, match="nothing was saved by this run"):
        train(run_files(tmp_path / "run.safetensors", adapters, trainer), loss)
    assert not (tmp_path / "run.safetensors").exists()


def test_save_refuses_non_finite_weights(tmp_path):
    adapters, trainer, loss = setup()
    files = run_files(tmp_path / "run.safetensors", adapters, trainer)
    trainer.train_step(loss)
    with torch.no_grad():
        trainer.parameters()[-1].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="at step 1 are NaN or infinite; not saved"):
        files.save()
    assert list(tmp_path.iterdir()) == []


# -- a consistent pair, or the adapter alone ---------------------------------------------------------------


def saved_pair(folder: Path, steps: int, total: int | None = None):
    """A run of ``total`` steps stopped after ``steps``, saved; its files and its loss."""
    adapters, trainer, loss = setup(steps=total or steps)
    files = run_files(folder / "run.safetensors", adapters, trainer)
    train(files, loss, steps)
    return files, loss


def resumed(path: Path, **options):
    adapters, trainer, loss = setup(**options)
    resume(path, adapters, trainer)
    return adapters, trainer, loss


def test_both_files_carry_the_run_and_the_step(tmp_path):
    files, _ = saved_pair(tmp_path, 2)
    from tlora.format import read_metadata

    adapter, state = read_metadata(files.path), read_metadata(state_path(files.path))
    assert adapter["tlora.run_id"] == state["tlora.run_id"] == files.run_id and len(files.run_id) == 32
    assert adapter["tlora.steps"] == state["step"] == "2"
    assert "resume_adapter_only" not in json.loads(adapter["tlora.training"])  # about this machine: not written


def test_a_mismatched_pair_is_refused_saying_which_is_older(tmp_path):
    files, loss = saved_pair(tmp_path, 2, total=3)
    old_state = state_path(files.path).read_bytes()
    train(files, loss, 3)
    state_path(files.path).write_bytes(old_state)  # what a kill between the two renames leaves
    with pytest.raises(ValueError, match=r"at step 3 but its optimizer state run.safetensors.tlora-state at step 2: "):
        resumed(files.path)
    with pytest.raises(ValueError, match=r"tlora-state is older .*set resume_adapter_only"):
        resumed(files.path)
    adapters, trainer, _ = resumed(files.path, resume_adapter_only=True)
    assert trainer.step == 3 and all(not opt.state for opt in trainer.optimizers)  # a fresh optimizer
    assert all(torch.equal(weights(adapters)[k], v) for k, v in weights(files.adapters).items())


def test_files_of_two_runs_are_not_a_pair(tmp_path):
    a, _ = saved_pair(tmp_path / "a", 2)
    b, _ = saved_pair(tmp_path / "b", 2)
    state_path(b.path).write_bytes(state_path(a.path).read_bytes())
    with pytest.raises(ValueError, match="were written by different training runs"):
        resumed(b.path)


def test_a_truncated_state_is_named(tmp_path):
    files, _ = saved_pair(tmp_path, 2)
    state = state_path(files.path)
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match=r"run.safetensors.tlora-state is not a readable safetensors file"):
        resumed(files.path)


def test_a_state_with_nan_moments_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from tlora.format import read_metadata

    files, _ = saved_pair(tmp_path, 2)
    state = state_path(files.path)
    tensors, meta = load_file(state), read_metadata(state)
    key = next(k for k in tensors if k.endswith("exp_avg"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, state, metadata=meta)
    with pytest.raises(AdapterFileError, match=rf"tlora-state: {key} holds \d+ NaN"):
        resumed(files.path)


# -- kill -9 in the middle of a save ---------------------------------------------------------------------------


def child(folder: Path, point: str) -> None:
    """Train 1 step and save, then train step 2 and stop dead at ``point`` of its save."""
    adapters, trainer, loss = setup()
    files = run_files(folder / "run.safetensors", adapters, trainer)
    trainer.train_step(loss)
    files.save()
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        if (point == "adapter_written" and not renames) or (point == "state_written" and len(renames) == 1):
            stop()
        real_replace(src, dst)
        renames.append(dst)
        if (point == "between_renames" and len(renames) == 1) or (point == "after_both" and len(renames) == 2):
            stop()

    def stop():
        print("ready", flush=True)
        time.sleep(600)

    os.replace = replace
    trainer.train_step(loss)
    files.save()


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_anywhere_in_a_save(tmp_path, point):
    """The child is killed with SIGKILL at ``point``; the files left resume bit-exactly (a
    consistent pair) or are refused as a pair (adapter newer than its state), and the next save
    removes the temporaries the kill left."""
    proc = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path), point],
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    path = tmp_path / "run.safetensors"
    stray = sorted(p.name for p in tmp_path.glob(".*.tmp"))
    assert len(stray) == (1 if point.endswith("_written") else 0)
    from tlora.format import read_metadata

    steps = read_metadata(path)["tlora.steps"], read_metadata(state_path(path))["step"]
    assert steps == KILL_POINTS[point]
    if steps[0] != steps[1]:
        with pytest.raises(ValueError, match=r"optimizer state run\.safetensors\.tlora-state at step 1: .* is older"):
            resumed(path)
        adapters, trainer, loss = resumed(path, resume_adapter_only=True)
        assert trainer.step == 2
    else:
        adapters, trainer, loss = resumed(path)
    files = run_files(path, adapters, trainer)
    train(files, loss)
    assert not list(tmp_path.glob(".*.tmp"))  # cleaned at the next save
    if steps[0] == steps[1]:  # a consistent pair continues bit for bit
        expected = straight_run()
        assert all(torch.equal(weights(adapters)[k], v) for k, v in expected.items())


def test_only_the_packs_own_temporaries_are_removed(tmp_path):
    from tlora.format import write_safetensors

    ours = [".run.safetensors.ab12_xyz.tmp", ".run.safetensors.tlora-state.0123abcd.tmp"]
    others = [
        ".run.safetensors.tmp",
        "run.safetensors.ab12_xyz.tmp",
        ".run.safetensors.ab12_xyz.tmp.keep",
        ".other.safetensors.ab12_xyz.tmp",
        ".run.safetensors.AB12_XYZ.tmp",
        ".run.safetensors.toolong12.tmp",
    ]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    write_safetensors(tmp_path / "run.safetensors", {"a": torch.zeros(1)}, {})
    write_safetensors(tmp_path / "run.safetensors.tlora-state", {"a": torch.zeros(1)}, {})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*others, "run.safetensors", "run.safetensors.tlora-state"])


# -- the batch ---------------------------------------------------------------------------------------------------


def test_a_batch_larger_than_the_dataset_is_clamped_and_recorded(caplog):
    options = TrainingOptions(batch_size=8)
    with caplog.at_level(logging.WARNING, logger="comfyui-tlora"):
        fitted = fit_batch(options, 3)
    assert fitted == options.replace(batch_size=3)
    assert "batch_size 8 is larger than the 3 training images: training at batch size 3" in caplog.text
    assert fit_batch(options, 8) is options
    adapters = setup()[0]
    assert json.loads(training_metadata(fitted, adapters, "Toy", "t")["tlora.training"])["batch_size"] == 3


if __name__ == "__main__":
    child(Path(sys.argv[1]), sys.argv[2])
