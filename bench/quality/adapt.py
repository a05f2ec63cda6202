"""The adaptation study: each method, at a chosen size, trained on the few shots of the new
class through the pack's own code path (:func:`tlora.model.select_modules`,
:func:`~tlora.model.make_adapters`, :func:`~tlora.model.attach`, :class:`tlora.train.Trainer`
with :func:`~tlora.train.step_generator`), then scored on held-out images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tlora.adapters.base import Adapter
from tlora.adapters.soda import SODA, soda_preset
from tlora.model import attached, make_adapters, select_modules
from tlora.options import TrainingOptions
from tlora.train import Trainer, step_generator

from .metrics import DigitJudge, EvalSet, denoising_loss
from .unet import UNet, prediction_errors, random_batch, sample

METHOD_NAMES = {
    "lora": "LoRA",
    "tlora": "TLoRA",
    "tlora_star": "TLoRA*",
    "transform": "transform-only",
    "residual": "residual-only",
    "soda": "SODA",
    "svdiff": "SVDiff",
    "full": "full fine-tuning",
}
GROUP_NAMES = {"attention": "attn", "proj": "proj", "feed_forward": "ff", "conv": "conv"}


class FullDelta(Adapter):
    """Full fine-tuning as an adapter: ``W' = W + D`` with a dense trainable ``D`` (0 at init)."""

    method = "full"

    def __init__(self, weight_shape: tuple[int, ...]):
        super().__init__(weight_shape)
        self.delta = nn.Parameter(torch.zeros(self.weight_shape))

    def merged_weight(self, weight: Tensor) -> Tensor:
        self._check_weight(weight)
        return weight.float() + self.delta


@dataclass(frozen=True)
class Spec:
    """One method at one size. ``transform_rank``/``residual_rank``: the TLoRA family's ring
    ranks (LoRA: ``residual_rank`` is r); ``num_factors``: SODA's Kronecker factors per
    rotation; ``groups``: the layers adapted (:data:`tlora.model.TARGET_GROUPS`)."""

    method: str
    transform_rank: int = 0
    residual_rank: int = 0
    num_factors: int = 3
    groups: tuple[str, ...] = ("attention",)

    @property
    def label(self) -> str:
        m = self.method
        if m == "lora":
            return f"LoRA r={self.residual_rank}"
        if m in ("tlora", "tlora_star"):
            return f"{METHOD_NAMES[m]}({self.transform_rank},{self.residual_rank})"
        if m == "transform":
            return f"transform({self.transform_rank})"
        if m == "residual":
            return f"residual({self.residual_rank})"
        if m == "soda":
            return f"SODA k={self.num_factors}"
        if m == "svdiff":
            return "SVDiff " + "+".join(GROUP_NAMES[g] for g in self.groups)
        return METHOD_NAMES[m]


def build_adapters(model: nn.Module, spec: Spec, seed: int) -> tuple[dict[str, nn.Module], dict[str, Adapter]]:
    """The modules ``spec`` adapts and a fresh adapter for each (layer i seeded ``seed + i``)."""
    modules = select_modules(model, spec.groups)
    if spec.method == "full":
        adapters: dict[str, Adapter] = {n: FullDelta(tuple(m.weight.shape)) for n, m in modules.items()}
    elif spec.method == "soda":
        adapters = {}
        for name, module in modules.items():
            adapters[name] = SODA(tuple(module.weight.shape), soda_preset("soda", num_factors=spec.num_factors))
            adapters[name].bind(module.weight)
    else:
        ranks = {"transform_rank": spec.transform_rank, "residual_rank": spec.residual_rank}
        adapters = make_adapters(modules, spec.method, seed=seed, **ranks)
    return modules, adapters


def count_parameters(model: nn.Module, spec: Spec) -> int:
    """Trainable parameters of ``spec`` on ``model`` (the adapters' own count)."""
    _, adapters = build_adapters(model, spec, seed=0)
    return sum(a.num_parameters() for a in adapters.values())


@dataclass(frozen=True)
class AdaptConfig:
    steps: int = 150
    batch_size: int = 16
    weight_decay: float = 1e-4
    grad_clip: float = 1.0


def adapt(
    base: UNet, spec: Spec, images: Tensor, labels: Tensor, learning_rate: float, seed: int, config: AdaptConfig
) -> tuple[UNet, dict[str, Adapter], Trainer]:
    """A copy of ``base`` with ``spec``'s adapters attached and trained on ``(images, labels)``
    by :class:`tlora.train.Trainer` (AdamW; SODA: StiefelAdam on the rotations, same lr)."""
    model = copy.deepcopy(base).requires_grad_(False)
    modules, adapters = build_adapters(model, spec, seed)
    attached(modules, adapters).__enter__()  # the copy keeps its adapters for good
    trainer = Trainer(
        adapters,
        TrainingOptions(
            steps=config.steps,
            learning_rate=learning_rate,
            rotation_learning_rate=learning_rate,
            weight_decay=config.weight_decay,
            batch_size=config.batch_size,
            grad_clip=config.grad_clip,
            seed=seed,
        ),
    )

    def micro_loss(step: int, micro: int) -> Tensor:
        gen = step_generator(seed, step, micro)
        x0, y, t, noise = random_batch(images, labels, config.batch_size, gen)
        return prediction_errors(model, x0, y, t, noise).mean()

    while not trainer.done:
        trainer.train_step(micro_loss)
    return model, adapters, trainer


@dataclass(frozen=True)
class Scores:
    new_loss: float  # held-out denoising loss on the new class
    old_loss: float  # held-out denoising loss on the old classes
    fidelity: float  # fraction of new-class samples the judge calls the new class


def score(
    model: UNet, new_eval: EvalSet, old_eval: EvalSet, judge: DigitJudge, new_class: int, samples: int, seed: int
) -> tuple[Scores, Tensor]:
    """The model's scores and its ``samples`` new-class samples ``[n, 1, 8, 8]``."""
    labels = torch.full((samples,), new_class)
    images = sample(model, labels, torch.Generator().manual_seed(10_000 + seed))
    scores = Scores(denoising_loss(model, new_eval), denoising_loss(model, old_eval), judge.accuracy(images, labels))
    return scores, images


def class_accuracy(model: UNet, judge: DigitJudge, classes: list[int], per_class: int, seed: int) -> float:
    """Fraction of ``per_class`` samples of each class that the judge recognises as that class."""
    labels = torch.tensor(classes).repeat_interleave(per_class)
    return judge.accuracy(sample(model, labels, torch.Generator().manual_seed(20_000 + seed)), labels)
