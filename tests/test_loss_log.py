"""The loss log beside an adapter (tlora/run.py) and the command line's progress (tlora/progress.py)."""

import io
from types import SimpleNamespace

import pytest

from tlora.options import TrainingOptions
from tlora.progress import TrainingProgress, duration
from tlora.run import LOSS_LOG_HEADER, RunFiles, StepRecord, loss_log_path


def run_files(path, step=0, on_step=None, **options):
    trainer = SimpleNamespace(config=TrainingOptions(**options), step=step)
    return RunFiles(trainer, {}, {}, path, on_step)


def take_steps(files, losses):
    for loss in losses:
        files.trainer.step += 1
        files.log_step(loss)


def rows(path):
    lines = path.read_text().splitlines()
    assert lines[0] == LOSS_LOG_HEADER
    return [line.split(",") for line in lines[1:]]


def test_a_row_per_step_beside_the_adapter_with_the_step_lr(tmp_path):
    adapter = tmp_path / "runs" / "subject.safetensors"
    seen = []
    files = run_files(adapter, on_step=seen.append, steps=10, learning_rate=1e-3, warmup_steps=4)
    take_steps(files, [0.5, 0.25, 0.125])
    assert loss_log_path(adapter) == tmp_path / "runs" / "subject.loss.csv"
    table = rows(loss_log_path(adapter))
    assert [int(r[0]) for r in table] == [1, 2, 3]
    assert [float(r[1]) for r in table] == [0.5, 0.25, 0.125]
    assert [float(r[2]) for r in table] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])  # warm-up: (step / 4) · lr
    times = [float(r[3]) for r in table]
    assert times == sorted(times) and times[0] > 1.7e9  # seconds since the epoch
    assert [r.step for r in seen] == [1, 2, 3] and seen[2].loss == 0.125


def test_a_resumed_run_keeps_the_rows_before_it_and_a_fresh_run_starts_over(tmp_path):
    adapter = tmp_path / "subject.safetensors"
    take_steps(run_files(adapter, steps=10), [5, 4, 3, 2, 1])  # went on to step 5, saved at step 2
    take_steps(run_files(adapter, step=2, steps=10), [30, 20])  # resumed from the step-2 save
    assert [(int(r[0]), float(r[1])) for r in rows(loss_log_path(adapter))] == [(1, 5), (2, 4), (3, 30), (4, 20)]
    take_steps(run_files(adapter, steps=10), [9])
    assert [int(r[0]) for r in rows(loss_log_path(adapter))] == [1]


def test_a_run_kept_in_memory_writes_no_log_but_reports(tmp_path):
    seen = []
    take_steps(run_files(None, on_step=seen.append, steps=3), [1.0, 2.0])
    assert [r.loss for r in seen] == [1.0, 2.0] and list(tmp_path.iterdir()) == []


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_lines_with_speed_and_eta_when_not_a_terminal():
    out, clock = io.StringIO(), Clock()
    progress = TrainingProgress(steps=100, images_per_step=8, stream=out, clock=clock)
    for step in range(11, 101):  # resumed at step 10: speed counts from the first step seen
        progress(StepRecord(step, 0.5, 1e-4, 0.0))
        clock.now += 2.0  # 2 s per step: 4 images per second
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 11/100  loss 0.5000  lr 0.0001"
    assert [line.split()[1] for line in lines] == ["11/100", *(f"{s}/100" for s in range(15, 101, 5))]
    assert lines[1] == "step 15/100  loss 0.5000  lr 0.0001  4 img/s  eta 0:02:50"  # 85 steps left × 2 s
    assert lines[-1].endswith("eta 0:00:00")


def test_a_bar_on_a_terminal():
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out, clock = Terminal(), Clock()
    progress = TrainingProgress(steps=50, images_per_step=2, stream=out, clock=clock)
    for step in range(1, 4):
        progress(StepRecord(step, 0.25, 1e-4, 0.0))
        clock.now += 0.5
    progress.close()
    text = out.getvalue()
    assert "3/50" in text and "loss 0.2500, 4 img/s" in text and "\r" in text
    assert "step 1/50  loss" not in text  # no plain lines on a terminal


def test_duration():
    assert duration(0) == "0:00:00" and duration(3725.4) == "1:02:05"
