"""The command line's training progress: a tqdm bar on a terminal (loss, images per second,
ETA), plain lines when the output is a file or a pipe. Fed one :class:`tlora.run.StepRecord`
per optimizer step (``RunFiles.on_step``)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .run import StepRecord

LINES = 20  # plain output: about this many lines over a run, plus the first and the last step


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainingProgress:
    """Shows a run of ``steps`` optimizer steps of ``images_per_step`` images each (the global
    batch). Speed and ETA count from the first step it sees, so setup and a resumed run's earlier
    steps do not skew them."""

    def __init__(self, steps: int, images_per_step: int, stream: TextIO | None = None, clock=time.monotonic):
        self.steps, self.images_per_step = steps, images_per_step
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.every = max(1, steps // LINES)
        self.bar = None
        self._first: tuple[int, float] | None = None  # (step, clock) of the first record

    def images_per_second(self, record: StepRecord) -> float | None:
        first_step, first_time = self._first
        elapsed = self.clock() - first_time
        return self.images_per_step * (record.step - first_step) / elapsed if record.step > first_step else None

    def line(self, record: StepRecord) -> str:
        """``step 40/500  loss 0.1234  lr 1e-04  12.5 img/s  eta 0:03:04``."""
        text = f"step {record.step}/{self.steps}  loss {record.loss:.4f}  lr {record.lr:.2g}"
        speed = self.images_per_second(record)
        if speed:
            steps_per_second = speed / self.images_per_step
            text += f"  {speed:.3g} img/s  eta {duration((self.steps - record.step) / steps_per_second)}"
        return text

    def __call__(self, record: StepRecord) -> None:
        if self._first is None:
            self._first = (record.step, self.clock())
            if self.stream.isatty():
                self.bar = self._tqdm(initial=record.step - 1)
        if self.bar is not None:
            speed = self.images_per_second(record)
            self.bar.set_postfix_str(f"loss {record.loss:.4f}" + (f", {speed:.3g} img/s" if speed else ""), False)
            self.bar.update(record.step - self.bar.n)
        elif record.step == self._first[0] or record.step % self.every == 0 or record.step == self.steps:
            print(self.line(record), file=self.stream, flush=True)

    def _tqdm(self, initial: int):
        try:
            from tqdm import tqdm  # ships with ComfyUI, which `train` runs in
        except ImportError:
            return None
        return tqdm(total=self.steps, initial=initial, unit="step", file=self.stream, dynamic_ncols=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
