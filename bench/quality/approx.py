"""The approximation study (TLoRA paper, Sec. 3): with the fully fine-tuned weights ``W*`` as the
target, fit each structure's ``W'`` to ``W*`` and report ``‖W' − W*‖_F / ‖W* − W‖_F`` per layer.

- LoRA: the best rank-r fit, the truncated SVD of ``W* − W`` (:func:`tlora.export.low_rank`);
- every other structure: its adapter's ``merged_weight`` fitted by :class:`tlora.train.Trainer`
  (AdamW, or StiefelAdam on SODA's rotations) on ``Σ_layers ‖W' − W*‖² / ‖W* − W‖²``, from the
  adapter's own init; TLoRA* starts its LoRA part at the truncated SVD, so it never starts
  worse than LoRA of its rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tlora.export import low_rank
from tlora.options import TrainingOptions
from tlora.train import Trainer

from .adapt import Spec, build_adapters
from .metrics import relative_error

# Layer types by the end of the module name.
LAYER_TYPES: dict[str, tuple[str, ...]] = {
    "self-attention q/k/v/out": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
    "cross-attention q/out": ("attn2.to_q", "attn2.to_out.0"),
    "cross-attention k/v (prompt side)": ("attn2.to_k", "attn2.to_v"),
}


def layer_type(name: str) -> str:
    for kind, suffixes in LAYER_TYPES.items():
        if name.endswith(suffixes):
            return kind
    raise ValueError(f"{name} is not an attention layer")


@dataclass(frozen=True)
class FitConfig:
    steps: int = 400
    learning_rate: float = 3e-2


def fit(
    base: nn.Module, targets: Mapping[str, Tensor], spec: Spec, config: FitConfig, seed: int = 0
) -> tuple[dict[str, float], dict[str, int]]:
    """Fit ``spec`` to the target weights ``targets`` (``name → W*``) of ``base``'s layers;
    returns each layer's relative error and parameter count."""
    modules, adapters = build_adapters(base, spec, seed)
    adapters = {n: adapters[n] for n in targets}
    weights = {n: modules[n].weight.detach() for n in targets}
    counts = {n: a.num_parameters() for n, a in adapters.items()}
    if spec.method == "lora":
        return {n: _svd_error(weights[n], targets[n], spec.residual_rank) for n in targets}, counts
    if spec.method == "tlora_star":
        with torch.no_grad():
            for n, a in adapters.items():
                up, down = low_rank(targets[n] - weights[n], spec.residual_rank)
                a.lora_up.copy_(up / a.scale)
                a.lora_down.copy_(down)
    norms = {n: (targets[n] - weights[n]).pow(2).sum() for n in targets}
    trainer = Trainer(
        adapters,
        TrainingOptions(
            steps=config.steps,
            learning_rate=config.learning_rate,
            rotation_learning_rate=config.learning_rate,
            weight_decay=0.0,
            grad_clip=0.0,
            schedule="cosine",
            seed=seed,
        ),
    )

    def micro_loss(step: int, micro: int) -> Tensor:
        return sum((adapters[n].merged_weight(weights[n]) - targets[n]).pow(2).sum() / norms[n] for n in targets)

    while not trainer.done:
        trainer.train_step(micro_loss)
    with torch.no_grad():
        errors = {n: relative_error(adapters[n].merged_weight(weights[n]), targets[n], weights[n]) for n in targets}
    return errors, counts


def _svd_error(weight: Tensor, target: Tensor, rank: int) -> float:
    up, down = low_rank(target - weight, rank)
    return relative_error(weight + up @ down, target, weight)
