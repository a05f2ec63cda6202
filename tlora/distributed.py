"""Data-parallel training across processes (``torchrun``), host-free.

Every rank (one process, one device) holds the same adapters and trains them on its shard of
each micro-batch. Once per optimizer step, after the micro-batches' backward and before clipping,
one all-reduce averages the adapters' gradients across ranks (flattened into one buffer; the
step's loss and each rank's stop flag ride along), so every rank applies the same update and
the adapters stay identical without broadcasts.

Same result as one process: every rank draws the whole micro-batch of ``batch_size × ranks``
images, its noise levels and its noise from :func:`tlora.train.step_generator` alike, takes the
slice :meth:`World.shard` gives it, and scales its mean loss by :meth:`World.shard_weight`, so
the ranks' average is the single-process mean over the whole micro-batch.

Stopping: a signal (Ctrl-C, SIGTERM) on any rank sets that rank's flag; the next exchange
tells every rank, and all of them raise ``interrupt`` at the same step (the step's gradients
are dropped, the adapters are those of the last finished step). A rank that dies or hangs makes
the exchange fail (gloo: at once when the process is gone; NCCL and hangs: after ``step_timeout``),
and the others raise ``interrupt`` too, with :attr:`DataParallel.lost` saying why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

SETUP_TIMEOUT = timedelta(minutes=30)  # joining, and the first exchange: every rank boots its host and model first
STEP_TIMEOUT = 300.0  # seconds one rank may wait for the others at a step (rank 0 saves and previews meanwhile)
ESCALATE_AFTER = 3.0  # seconds: a second signal later than this stops at once (torchrun relays Ctrl-C a second time)


class Stopped(Exception):
    """The run stopped at a step boundary (a stop was asked for, or a rank was lost)."""


@dataclass(frozen=True)
class World:
    """Which rank this process is: ``rank`` of ``size`` in all, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size or self.local_rank < 0:
            raise ValueError(f"bad rank {self.rank} (local {self.local_rank}) of {self.size} processes")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """The rank torchrun gives this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process without."""
        env = os.environ if env is None else env
        rank = int(env.get("RANK", 0))
        return cls(rank=rank, size=int(env.get("WORLD_SIZE", 1)), local_rank=int(env.get("LOCAL_RANK", rank)))

    @classmethod
    def current(cls) -> World:
        """This process's rank in the running process group (one process when there is none)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and reports progress."""
        return self.rank == 0

    def shard(self, count: int) -> slice:
        """This rank's part of a micro-batch of ``count`` items: contiguous slices whose sizes differ
        by at most one, in rank order, whose union is ``range(count)``."""
        if count < self.size:
            raise ValueError(f"a micro-batch of {count} cannot be shared by {self.size} ranks")
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def shard_weight(self, count: int) -> float:
        """``size · |shard| / count``: this rank's mean loss times this, averaged over ranks, is the
        mean over all ``count`` items (1 when the shards are equal)."""
        part = self.shard(count)
        return self.size * (part.stop - part.start) / count

    def batch_summary(self, batch_size: int, grad_accumulation: int, images: int) -> str:
        """The global batch, said at start; a ValueError when there are fewer images than ranks."""
        if images < self.size:
            raise ValueError(f"{self.size} ranks need at least {self.size} training images, got {images}")
        wanted = batch_size * self.size
        micro = min(images, wanted)
        line = (
            f"global batch {micro * grad_accumulation} images per step = {batch_size} per rank × "
            f"{self.size} rank{'s' * (self.size > 1)} × {grad_accumulation} micro-batch"
            f"{'es' * (grad_accumulation > 1)}"
        )
        return line + (f" (only {images} images: {micro} per micro-batch)" if micro < wanted else "")

    def select_device(self) -> None:
        """With CUDA, make ``cuda:LOCAL_RANK`` this process's device (before the host picks its device)."""
        if not torch.cuda.is_available():
            return
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPUs here: "
                "--nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(self.local_rank)


def flat_gradients(parameters: Sequence[nn.Parameter], device: torch.device) -> Tensor:
    """Every parameter's gradient flattened into one fp32 vector (zeros where a gradient is None)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float32)
            for p in parameters
        ]
    )


def set_gradients(parameters: Sequence[nn.Parameter], flat: Tensor) -> None:
    """Write ``flat`` (as :func:`flat_gradients` laid it out) back into the gradients that exist."""
    offset = 0
    for p in parameters:
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


@dataclass
class DataParallel:
    """This process's part in a (maybe one-process) data-parallel run: joins the process group
    (NCCL on CUDA, gloo on CPU) on ``__enter__`` and leaves it on ``__exit__``; called by
    :class:`tlora.train.Trainer` once per step (its ``sync``) to exchange gradients and stop flags.

    ``interrupt``: the exception type raised on every rank when the run stops (the host's own
    cancel exception, so the host's trainer saves what was trained)."""

    world: World = field(default_factory=World)
    interrupt: Callable[[str], BaseException] = Stopped
    step_timeout: float = STEP_TIMEOUT
    stop_reason: str | None = None  # this rank was asked to stop (by a signal): why
    lost: str | None = None  # the exchange failed: a rank died or hung
    exchanges: int = 0
    _first_signal: float | None = None
    _step_group: object | None = None

    def __enter__(self) -> DataParallel:
        if self.world.size > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, rank=self.world.rank, world_size=self.world.size, timeout=SETUP_TIMEOUT)
            self._step_group = dist.new_group(timeout=timedelta(seconds=self.step_timeout))
        return self

    def __exit__(self, *exc) -> None:
        if self.world.size > 1 and dist.is_initialized() and self.lost is None:
            dist.destroy_process_group()

    @property
    def started(self) -> bool:
        """Training has begun (a step reached the exchange): from now on a signal stops at a step boundary."""
        return self.exchanges > 0

    def __call__(self, parameters: Sequence[nn.Parameter], loss_total: float) -> float:
        """Average the gradients of ``parameters`` across ranks, in place; returns ``loss_total``
        averaged across ranks. Raises ``interrupt`` on every rank if any rank asked to stop, and on
        the survivors if a rank is lost."""
        self.exchanges += 1
        if self.world.size == 1:
            if self.stop_reason:
                raise self.interrupt(self.stop_reason)
            return loss_total
        device = parameters[0].device
        asks = torch.zeros(self.world.size, device=device)
        asks[self.world.rank] = float(self.stop_reason is not None)
        buffer = torch.cat([flat_gradients(parameters, device), torch.tensor([loss_total], device=device), asks])
        first = self.exchanges == 1  # ranks finish setting up at their own pace: that one waits up to SETUP_TIMEOUT
        try:
            dist.all_reduce(buffer, group=None if first else self._step_group)
            tail = buffer[-self.world.size - 1 :].tolist()  # waits for the collective (NCCL runs it async)
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.lost = (
                f"rank {self.world.rank} lost the other ranks in this run's step {self.exchanges} (a rank died, or "
                f"hung for over {self.step_timeout:g} s): {reason}"
            )
            raise self.interrupt(self.lost) from err
        asked = [rank for rank, flag in enumerate(tail[1:]) if flag > 0]
        if asked:
            raise self.interrupt(f"stop asked for on rank {', '.join(map(str, asked))}")
        set_gradients(parameters, buffer[: -self.world.size - 1] / self.world.size)
        return tail[0] / self.world.size

    def request_stop(self, reason: str) -> None:
        """Ask every rank to stop at the next exchange (a signal handler calls this). Before
        training starts, or on a second signal more than :data:`ESCALATE_AFTER` s after the first,
        stop at once (``KeyboardInterrupt``)."""
        now = time.monotonic()
        if not self.started or (self._first_signal is not None and now - self._first_signal > ESCALATE_AFTER):
            raise KeyboardInterrupt(reason)
        if self._first_signal is None:
            self._first_signal = now
            self.stop_reason = f"{reason} on rank {self.world.rank}"

    @contextlib.contextmanager
    def stop_on_signals(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
        """While inside, SIGINT and SIGTERM call :meth:`request_stop` (the handlers are restored after)."""

        def handler(signum, frame):
            self.request_stop(signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in signals}
        try:
            yield
        finally:
            for s, old in previous.items():
                signal.signal(s, old)

    def wait_for_all(self) -> None:
        """A barrier (``step_timeout``): ranks that stopped wait until rank 0 has saved. Nothing
        when alone or when a rank is lost."""
        if self.world.size > 1 and self.lost is None:
            with contextlib.suppress(RuntimeError):
                dist.barrier(group=self._step_group)
