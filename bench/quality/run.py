"""Does it work better than LoRA? The papers' claims reproduced at a scale a 2-core CPU runs
(issue #7): a small diffusion UNet pretrained on nine digit classes, adapted to the tenth
from 10 images by every method at matched parameter budgets, and the approximation study.

    pip install -r bench/quality/requirements.txt
    python bench/quality/run.py [--workers 2] [--seeds 3]

Writes bench/quality/RESULTS.md (the part between its "generated" markers), results.json,
adaptation.png, approximation.png and samples/*.png. The pretrained base is cached in
bench/quality/.cache/ (git-ignored) by a hash of its settings and data; ``--no-cache``
trains it again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from bench.quality.adapt import AdaptConfig, Spec, class_accuracy, count_parameters, score  # noqa: E402
from bench.quality.approx import FitConfig  # noqa: E402
from bench.quality.data import load_digits_arrays, split_digits, to_model_range, to_pixels  # noqa: E402
from bench.quality.jobs import AdaptJob, Context, FitJob, init_worker, run_adapt, run_fit  # noqa: E402
from bench.quality.metrics import DigitJudge, make_eval_set  # noqa: E402
from bench.quality.pretrain import PretrainConfig, load_or_pretrain  # noqa: E402
from bench.quality.report import (  # noqa: E402
    aggregate_adaptation,
    aggregate_fits,
    draw_figures,
    draw_samples,
    rank_table,
    write_results_md,
)
from bench.quality.unet import UNetConfig  # noqa: E402

NEW_CLASS = 9
SHOTS = 10
VAL_COUNT = 40
SAMPLES = 24  # new-class samples per run, judged
SHOWN = 12  # of which shown in the sample grids
SPLIT_PARTS = ("old_train", "old_test", "new_train", "new_val", "new_test")
ATTENTION_ONLY = ("attention",)
SVDIFF_GROUPS = (
    ("attention",),
    ("attention", "proj"),
    ("attention", "proj", "feed_forward"),
    ("attention", "proj", "feed_forward", "conv"),
)

# Every method at 4-5 sizes (SVDiff grows only by adapting more layer groups).
ADAPT_SPECS: dict[str, list[Spec]] = {
    "lora": [Spec("lora", residual_rank=r) for r in (1, 2, 4, 16)],
    "tlora": [Spec("tlora", t, r) for t, r in ((1, 1), (1, 2), (2, 2), (2, 3), (4, 6))],
    "tlora_star": [Spec("tlora_star", 1, r) for r in (1, 2, 4, 16)],
    "transform": [Spec("transform", t) for t in (1, 2, 3, 6)],
    "residual": [Spec("residual", 0, r) for r in (1, 2, 3, 4, 8)],
    "soda": [Spec("soda", num_factors=k) for k in (6, 3, 2, 1)],
    "svdiff": [Spec("svdiff", groups=g) for g in SVDIFF_GROUPS],
    "full": [Spec("full")],
}
SWEEP_LABELS = {"LoRA r=1", "TLoRA(1,2)", "TLoRA*(1,1)", "transform(2)", "residual(2)", "SODA k=3", "SVDiff attn"}
SWEEP_LABELS |= {"full fine-tuning"}
# The size each method's learning rate is chosen at, and its grid (×3 steps; SODA and SVDiff
# shift spectra and rotate, and want larger rates, full fine-tuning smaller ones).
SWEEP_SPEC = {m: next(s for s in specs if s.label in SWEEP_LABELS) for m, specs in ADAPT_SPECS.items()}
LEARNING_RATES = {m: (1e-3, 3e-3, 1e-2) for m in ADAPT_SPECS}
LEARNING_RATES.update(soda=(3e-3, 1e-2, 3e-2), svdiff=(3e-3, 1e-2, 3e-2), full=(1e-4, 3e-4, 1e-3))

APPROX_SPECS: list[Spec] = [
    *(Spec("lora", residual_rank=r) for r in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)),
    *(Spec("tlora", t, r) for t, r in ((1, 1), (1, 2), (2, 2), (2, 3), (4, 6))),
    *(Spec("tlora_star", 1, r) for r in (1, 2, 4)),
    *(Spec("transform", t) for t in (1, 2, 3, 6)),
    *(Spec("residual", 0, r) for r in (1, 2, 3, 4, 8)),
    *(Spec("soda", num_factors=k) for k in (6, 3, 2, 1)),
    Spec("svdiff"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="adaptation seeds (init, batches, noise)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one thread each")
    parser.add_argument("--pretrain-steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--adapt-steps", type=int, default=AdaptConfig.steps)
    parser.add_argument("--fit-steps", type=int, default=FitConfig.steps)
    parser.add_argument("--no-cache", action="store_true", help="pretrain the base again even if it is cached")
    parser.add_argument("--output", type=Path, default=HERE, help="folder for RESULTS.md, results.json, figures")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(1)
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        phases[name] = time.perf_counter() - since
        log(f"{name}: {phases[name]:.0f} s")
        return time.perf_counter()

    images, labels = load_digits_arrays()
    split = split_digits(images, labels, NEW_CLASS, shots=SHOTS, val_count=VAL_COUNT, seed=0)
    judge = DigitJudge().fit(to_model_range(images), torch.from_numpy(labels), steps=600)
    unet, pretrain = UNetConfig(), PretrainConfig(steps=args.pretrain_steps)
    mark = time.perf_counter()
    base = load_or_pretrain(*split.old_train, unet, pretrain, None if args.no_cache else HERE / ".cache", log)
    mark = phase("pretraining", mark)
    evals = {
        "new_val": make_eval_set(*split.new_val, 4, seed=1),
        "new_test": make_eval_set(*split.new_test, 4, seed=2),
        "old_test": make_eval_set(*split.old_test, 1, seed=3),
    }
    base_scores, base_samples = score(base, evals["new_test"], evals["old_test"], judge, NEW_CLASS, SAMPLES, 0)
    old_accuracy = class_accuracy(base, judge, [c for c in range(10) if c != NEW_CLASS], per_class=8, seed=0)
    lora1 = count_parameters(base, Spec("lora", residual_rank=1))
    context = Context(
        unet=unet,
        base_state=base.state_dict(),
        split=split,
        evals=evals,
        judge_state=judge.state_dict(),
        adapt=AdaptConfig(steps=args.adapt_steps),
        fit=FitConfig(steps=args.fit_steps),
        samples=SAMPLES,
    )
    seeds = list(range(args.seeds))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=init_worker, initargs=(context,)) as pool:
        sweep_jobs = [AdaptJob(SWEEP_SPEC[m], lr, seed=0, on="val") for m in ADAPT_SPECS for lr in LEARNING_RATES[m]]
        sweep = list(pool.map(run_adapt, sweep_jobs))
        chosen = {}
        for m in ADAPT_SPECS:
            runs = [r for r in sweep if r.job.spec.method == m]
            chosen[m] = min(runs, key=lambda r: r.scores.new_loss).job.learning_rate
        log(f"learning rates: {chosen}")
        mark = phase("learning-rate sweep", mark)

        adapt_jobs = [
            AdaptJob(spec, chosen[m], seed, keep_samples=seed == 0, keep_delta=m == "full")
            for m, specs in ADAPT_SPECS.items()
            for spec in specs
            for seed in seeds
        ]
        adapt_jobs.sort(key=lambda j: j.spec.method != "full")  # W* first
        runs = list(pool.map(run_adapt, adapt_jobs))
        mark = phase("adaptation runs", mark)

        targets = {r.job.seed: r.deltas for r in runs if r.deltas is not None}
        fits = list(pool.map(run_fit, [FitJob(spec, seed, targets[seed]) for spec in APPROX_SPECS for seed in seeds]))
        mark = phase("approximation fits", mark)

    results = {
        "command": " ".join(["python bench/quality/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            "new_class": NEW_CLASS,
            "shots": SHOTS,
            "split": {k: len(getattr(split, k)[1]) for k in SPLIT_PARTS},
            "samples": SAMPLES,
            "unet": asdict(unet),
            "pretrain": asdict(pretrain),
            "adapt": asdict(context.adapt),
            "fit": asdict(context.fit),
            "seeds": seeds,
            "learning_rates": {m: list(v) for m, v in LEARNING_RATES.items()},
            "chosen_learning_rates": chosen,
            "lora_r1_parameters": lora1,
        },
        "base": {**asdict(base_scores), "old_class_sample_accuracy": old_accuracy},
        "sweep": [
            {"label": r.job.spec.label, "lr": r.job.learning_rate, "val_new_loss": r.scores.new_loss} for r in sweep
        ],
        "adaptation": aggregate_adaptation(runs, lora1),
        "approximation": aggregate_fits(fits, base),
        "ranks": rank_table(targets, base),
    }
    phases["total"] = time.perf_counter() - started
    results["timing"] = {
        "seconds": {k: round(v, 1) for k, v in phases.items()},
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out = args.output
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    draw_figures(results, out)
    draw_samples(runs, split, to_pixels(base_samples[:SHOWN]), out / "samples", SHOWN)
    write_results_md(out / "RESULTS.md", results)
    log(f"done in {phases['total']:.0f} s; wrote {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
