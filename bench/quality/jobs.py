"""The benchmark's units of work, run in parallel worker processes (one thread each): an
adaptation run (train, score, keep a few samples) or a fit of one structure to ``W*``.

Each worker gets the shared :class:`Context` once (base weights, data, eval sets, judge).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapt import AdaptConfig, Scores, Spec, adapt, score
from .approx import FitConfig, fit
from .data import Split, to_pixels
from .metrics import DigitJudge, EvalSet, denoising_loss
from .unet import UNet, UNetConfig


@dataclass(frozen=True)
class Context:
    unet: UNetConfig
    base_state: dict[str, Tensor]
    split: Split
    evals: dict[str, EvalSet]  # "new_val", "new_test", "old_test"
    judge_state: dict[str, Tensor]
    adapt: AdaptConfig
    fit: FitConfig
    samples: int


@dataclass(frozen=True)
class AdaptJob:
    spec: Spec
    learning_rate: float
    seed: int
    on: str = "test"  # "val": validation loss only (choosing the lr); "test": every score
    keep_samples: bool = False
    keep_delta: bool = False  # full fine-tuning: return W* − W per layer


@dataclass(frozen=True)
class AdaptResult:
    job: AdaptJob
    parameters: int
    scores: Scores
    samples: object  # uint8 [n, 8, 8] or None
    deltas: dict[str, Tensor] | None
    seconds: float


@dataclass(frozen=True)
class FitJob:
    spec: Spec
    seed: int
    deltas: dict[str, Tensor]  # the target's W* − W per layer


@dataclass(frozen=True)
class FitResult:
    job: FitJob
    errors: dict[str, float]
    counts: dict[str, int]


_worker: dict[str, object] = {}


def init_worker(context: Context, threads: int = 1) -> None:
    """Set up a worker process: its thread count, the base model, the judge."""
    torch.set_num_threads(threads)
    base = UNet(context.unet)
    base.load_state_dict(context.base_state)
    judge = DigitJudge()
    judge.load_state_dict(context.judge_state)
    _worker.update(context=context, base=base.eval().requires_grad_(False), judge=judge.eval().requires_grad_(False))


def run_adapt(job: AdaptJob) -> AdaptResult:
    ctx: Context = _worker["context"]
    start = time.perf_counter()
    model, adapters, _ = adapt(_worker["base"], job.spec, *ctx.split.new_train, job.learning_rate, job.seed, ctx.adapt)
    samples = None
    if job.on == "val":  # choosing the learning rate: the validation loss is all that counts
        scores = Scores(denoising_loss(model, ctx.evals["new_val"]), math.nan, math.nan)
    else:
        judge, new_class = _worker["judge"], ctx.split.new_class
        scores, images = score(
            model, ctx.evals["new_test"], ctx.evals["old_test"], judge, new_class, ctx.samples, job.seed
        )
        samples = to_pixels(images) if job.keep_samples else None
    deltas = {n: a.delta.detach().clone() for n, a in adapters.items()} if job.keep_delta else None
    parameters = sum(a.num_parameters() for a in adapters.values())
    return AdaptResult(job, parameters, scores, samples, deltas, time.perf_counter() - start)


def run_fit(job: FitJob) -> FitResult:
    ctx: Context = _worker["context"]
    base: UNet = _worker["base"]
    modules = dict(base.named_modules())
    targets = {n: modules[n].weight.detach() + d for n, d in job.deltas.items()}
    errors, counts = fit(base, targets, job.spec, ctx.fit, seed=job.seed)
    return FitResult(job, errors, counts)
