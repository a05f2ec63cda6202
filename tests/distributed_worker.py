"""One rank of tests/test_distributed.py's data-parallel runs, as torchrun would start it (rank and
world from the environment): ``python tests/distributed_worker.py SCENARIO OUT_DIR``.

A toy two-layer model with TLoRA adapters trains through :class:`tlora.train.Trainer` with
:class:`tlora.distributed.DataParallel` as its ``sync``; each micro-batch is drawn whole from the
step's generator and sharded as the ComfyUI trainer does. Scenarios: ``train`` (4 steps),
``stop`` (rank 1 gets SIGTERM during step 2), ``lost`` (rank 1 exits during step 2), ``hang``
(rank 1 sleeps during step 2, the step timeout is 2 s). Each rank saves what it saw to
``OUT_DIR/rank<R>.pt``.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlora.distributed import DataParallel, Stopped, World
from tlora.model import attached, make_adapters
from tlora.options import TrainingOptions
from tlora.train import Trainer, step_generator

IMAGES = 5  # fewer than 2 ranks × 3: the micro-batch of 5 splits 3 + 2
DATA = torch.randn(IMAGES, 16, generator=torch.Generator().manual_seed(1))
TARGET = torch.randn(IMAGES, 4, generator=torch.Generator().manual_seed(2))
OPTIONS = TrainingOptions(
    steps=4,
    learning_rate=3e-2,
    grad_accumulation=2,
    grad_clip=0.05,  # active: clipping must see the averaged gradient
    regularizer="identity",
    regularizer_weight=0.1,  # added on every rank: its gradient must not be counted twice
    method="tlora",
    transform_rank=2,
    residual_rank=2,
)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.to_q, self.to_out = nn.Linear(16, 16), nn.Linear(16, 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) / 4
        self.requires_grad_(False)

    def forward(self, x):
        return self.to_out(torch.tanh(self.to_q(x)))


def micro_loss(model, world: World, batch_size: int, on_micro=None):
    """Mean squared error over this rank's shard of the micro-batch all ranks draw alike, weighted."""

    def loss(step, micro):
        if on_micro is not None:
            on_micro(step, micro)
        gen = step_generator(3, step, micro)
        drawn = torch.randperm(IMAGES, generator=gen)[: batch_size * world.size]
        noise = 0.05 * torch.randn(len(drawn), 16, generator=gen)
        mine = world.shard(len(drawn))
        idx = drawn[mine]
        per_item = (model(DATA[idx] + noise[mine]) - TARGET[idx]).pow(2).mean(dim=1)
        return per_item.mean() * world.shard_weight(len(drawn))

    return loss


def snapshot(adapters) -> dict:
    return {f"{n}.{k}": v.detach().clone() for n, a in adapters.items() for k, v in a.state_dict().items()}


def main(scenario: str, out: Path) -> None:
    world = World.from_env()
    batch_size = int(os.environ.get("BATCH_SIZE", 3))
    model = Toy()
    modules = {"to_q": model.to_q, "to_out": model.to_out}
    adapters = make_adapters(modules, OPTIONS.method, seed=0, **OPTIONS.adapter_options)
    attached(modules, adapters).__enter__()
    report = {"rank": world.rank, "size": world.size, "initial": snapshot(adapters)}

    def misbehave(step, micro):
        if world.rank != 1 or step != 1 or micro != 1:
            return
        if scenario == "stop":
            os.kill(os.getpid(), signal.SIGTERM)
        elif scenario == "lost":
            os._exit(3)
        elif scenario == "hang":
            time.sleep(60)

    timeout = 2.0 if scenario == "hang" else 60.0
    with DataParallel(world, step_timeout=timeout) as parallel, parallel.stop_on_signals():
        trainer = Trainer(adapters, OPTIONS, sync=parallel)
        loss = micro_loss(model, world, batch_size, misbehave)
        start = time.monotonic()
        try:
            while not trainer.done:
                start = time.monotonic()
                trainer.train_step(loss)
        except Stopped as err:
            report.update(stopped=str(err), lost=parallel.lost, waited=time.monotonic() - start)
    report.update(step=trainer.step, losses=trainer.losses)
    report["adapters"] = snapshot(adapters)
    torch.save(report, out / f"rank{world.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
