"""Data parallel without a host (tlora/distributed.py): sharding covers the single-process batch,
the weighted shard losses average to its mean, and two gloo ranks (separate processes, as
torchrun starts them) train the same adapters as one process, stop together, and survive a rank
that dies or hangs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.ranks import free_port_or_skip
from tlora.distributed import DataParallel, Stopped, World, flat_gradients, set_gradients

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = WORKER.parents[1]


@pytest.mark.parametrize("count", [1, 2, 5, 6, 7, 64])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_cover_the_micro_batch_once_in_order(count, size):
    if count < size:
        with pytest.raises(ValueError, match="cannot be shared"):
            World(0, size).shard(count)
        return
    parts = [World(rank, size).shard(count) for rank in range(size)]
    items = [i for part in parts for i in range(count)[part]]
    assert items == list(range(count))  # union = the single-process batch, each item once, rank order
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize(("count", "size"), [(5, 2), (7, 3), (8, 4), (4, 4)])
def test_weighted_shard_means_average_to_the_full_mean(count, size):
    values = torch.randn(count, generator=torch.Generator().manual_seed(count))
    shares = [values[World(r, size).shard(count)].mean() * World(r, size).shard_weight(count) for r in range(size)]
    torch.testing.assert_close(torch.stack(shares).mean(), values.mean())


def test_world_from_torchrun_environment():
    assert World.from_env({}) == World(0, 1, 0)
    assert World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    assert World.from_env({"RANK": "1", "WORLD_SIZE": "2"}).local_rank == 1
    assert not World(1, 2).is_main and World(0, 2).is_main
    with pytest.raises(ValueError, match="bad rank 2"):
        World.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert World.current() == World()  # no process group in this process


def test_global_batch_summary():
    assert World(0, 4).batch_summary(2, 3, 100) == (
        "global batch 24 images per step = 2 per rank × 4 ranks × 3 micro-batches"
    )
    assert World().batch_summary(1, 1, 10) == "global batch 1 images per step = 1 per rank × 1 rank × 1 micro-batch"
    assert World(0, 2).batch_summary(4, 1, 5).endswith("(only 5 images: 5 per micro-batch)")
    with pytest.raises(ValueError, match="2 ranks need at least 2 training images, got 1"):
        World(1, 2).batch_summary(1, 1, 1)


def test_flat_gradients_round_trip_and_keep_missing_ones_missing():
    a, b, c = (torch.nn.Parameter(torch.zeros(s)) for s in [(2, 3), (4,), (1, 1)])
    a.grad, c.grad = torch.arange(6.0).view(2, 3), torch.tensor([[7.0]])
    flat = flat_gradients([a, b, c], torch.device("cpu"))
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 7]
    set_gradients([a, b, c], flat * 2)
    assert a.grad.tolist() == [[0, 2, 4], [6, 8, 10]] and b.grad is None and c.grad.item() == 14


def test_one_process_passes_the_loss_through_and_stops_when_asked():
    parallel = DataParallel()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(KeyboardInterrupt):
        parallel.request_stop("SIGINT")  # before training starts: at once
    assert parallel([p], 1.5) == 1.5 and p.grad.tolist() == [1, 1, 1]
    parallel.request_stop("SIGTERM")
    with pytest.raises(Stopped, match="SIGTERM on rank 0"):
        parallel([p], 1.5)
    parallel.request_stop("SIGTERM")  # torchrun relays the terminal's Ctrl-C: a quick repeat is the same request
    parallel._first_signal -= 10
    with pytest.raises(KeyboardInterrupt):
        parallel.request_stop("SIGINT")  # a deliberate second signal later: at once


# -- two ranks, as torchrun starts them ----------------------------------------------------------


def launch(scenario: str, out: Path, size: int, batch_size: int) -> list[subprocess.Popen]:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port_or_skip()), "WORLD_SIZE": str(size)}
    env.update(OMP_NUM_THREADS="1", BATCH_SIZE=str(batch_size))
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(size)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[int]:
    codes = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"a rank hung: {err[-2000:]}")
        codes.append(proc.returncode)
        assert proc.returncode in (0, 3), err[-2000:]
    return codes


def test_two_ranks_train_what_one_process_trains(tmp_path):
    """Uneven shards (5 images, 3 per rank), accumulation, clipping and a regularizer."""
    finish(launch("train", tmp_path / "one", 1, 6))
    finish(launch("train", tmp_path / "two", 2, 3))
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    assert one["step"] == 4 and all(r["step"] == 4 for r in ranks)
    assert all(not torch.equal(one["initial"][k], v) for k, v in one["adapters"].items())  # it trained
    for key, value in one["adapters"].items():
        assert torch.equal(ranks[0]["adapters"][key], ranks[1]["adapters"][key])  # identical without broadcasts
        torch.testing.assert_close(ranks[0]["adapters"][key], value, atol=1e-6, rtol=1e-5)
    assert ranks[0]["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert ranks[1]["losses"] == ranks[0]["losses"]
    assert len(set(one["losses"])) == 4  # it trained: the loss changed every step


def test_a_stop_on_one_rank_stops_both_at_the_same_step(tmp_path):
    finish(launch("stop", tmp_path, 2, 3))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["step"] == 1 and r["stopped"] == "stop asked for on rank 1" and r["lost"] is None
    assert all(torch.equal(ranks[0]["adapters"][k], v) for k, v in ranks[1]["adapters"].items())


@pytest.mark.parametrize("scenario", ["lost", "hang"])
def test_a_dead_or_hung_rank_stops_the_others_in_bounded_time(scenario, tmp_path):
    procs = launch(scenario, tmp_path, 2, 3)
    begun = time.monotonic()
    try:
        finish(procs[:1], timeout=60)
    finally:
        procs[1].kill()
        procs[1].communicate()
    report = torch.load(tmp_path / "rank0.pt")
    assert report["step"] == 1 and report["lost"] is not None and report["stopped"] == report["lost"]
    assert "rank 0 lost the other ranks in this run's step 2" in report["lost"]
    assert report["waited"] < 30 and time.monotonic() - begun < 60
