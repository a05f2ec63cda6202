"""The training loop's logic, independent of any model host: optimizers, schedule, gradient
accumulation and clipping, regularizers, the DCO loss, a finite-loss guard, and a resumable
state. The host supplies one callable that computes a micro-batch's loss.

Determinism: everything random in a step (which images, which noise level, which noise)
comes from :func:`step_generator`, seeded by ``(seed, step, micro-batch)``, so training to
step M at once and resuming at N then training to M follow the same path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from . import batched
from .adapters.base import Adapter
from .format import write_safetensors
from .options import TrainingOptions
from .stiefel import adam, soda_optimizers
from .validate import all_finite


def step_generator(seed: int, step: int, micro: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """The random stream of one micro-batch: a function of ``(seed, step, micro)`` only."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63))


def dco_loss(model_error: Tensor, reference_error: Tensor, beta: float) -> Tensor:
    """Direct consistency optimization: ``−log σ(−β·(e_θ − e_ref))`` per sample, averaged;
    ``e`` are per-sample prediction MSEs of the adapted and the frozen base model."""
    return -torch.nn.functional.logsigmoid(-beta * (model_error - reference_error)).mean()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before applying that step."""


class NonFiniteWeightsError(NonFiniteLossError):
    """An update made adapter weights NaN or infinite while the loss was finite (bf16, a high
    learning rate); training stopped at once, before anything could save those weights."""


def check_finite_weights(parameters: list[Tensor], step: int) -> None:
    """Raise :class:`NonFiniteWeightsError` unless every adapter weight is finite after the
    update of ``step`` (1-based): one fused reduction over all of them."""
    if not all_finite(parameters):
        raise NonFiniteWeightsError(f"the update of step {step} made the adapter weights NaN or infinite")


@dataclass
class Trainer:
    """Optimizes ``adapters`` (``name → Adapter``): AdamW on TLoRA-family tensors and SODA's
    spectral shifts, StiefelAdam (or Adam on Cayley generators) on SODA's rotations."""

    adapters: Mapping[str, Adapter]
    config: TrainingOptions
    step: int = 0
    losses: list[float] = field(default_factory=list)
    # Data parallel: called once per step before clipping; averages the gradients and the loss
    # total across ranks in place and returns that total (tlora.distributed.DataParallel).
    sync: Callable[[list[nn.Parameter], float], float] | None = None

    def __post_init__(self):
        cfg = self.config
        roles = {name: a.parameter_roles() for name, a in self.adapters.items()}
        plain = [p for r in roles.values() for p in r.get("adamw", [])]
        soda = [self.adapters[name] for name, r in roles.items() if set(r) - {"adamw"}]
        self.optimizers: list[torch.optim.Optimizer] = []
        if plain:
            self.optimizers.append(adam(torch.optim.AdamW, plain, lr=cfg.learning_rate, weight_decay=cfg.weight_decay))
        if soda:
            self.optimizers += soda_optimizers(soda, cfg.learning_rate, cfg.rotation_learning_rate, cfg.weight_decay)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters() if p.requires_grad]

    def regularizer(self) -> Tensor:
        total = batched.regularizer(self.adapters.values())
        return torch.zeros(()) if total is None else total

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

    def train_step(self, micro_loss: Callable[[int, int], Tensor]) -> float:
        """One optimizer step over ``grad_accumulation`` micro-batches;
        ``micro_loss(step, micro)`` returns a micro-batch's loss. Returns the step's mean loss.
        Raises :class:`NonFiniteLossError` (leaving the adapters untouched) on NaN/inf."""
        cfg = self.config
        factor = cfg.lr_factor(self.step)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        total = 0.0
        for micro in range(cfg.grad_accumulation):
            loss = micro_loss(self.step, micro)
            reg = batched.regularizer(self.adapters.values())  # per group of same-shaped layers
            if reg is not None:
                loss = loss + reg.to(loss.device)
            if not torch.isfinite(loss):
                self.zero_grad()
                raise NonFiniteLossError(f"the loss became {loss.item()} at step {self.step + 1}")
            (loss / cfg.grad_accumulation).backward()
            total += loss.item()
        if self.sync is not None:
            total = self.sync(self.parameters(), total)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters(), cfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        self.zero_grad()
        check_finite_weights(self.parameters(), self.step + 1)
        self.step += 1
        mean = total / cfg.grad_accumulation
        self.losses.append(mean)
        return mean

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    # -- resumable state -------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Optimizer states as tensors plus JSON metadata (step, losses, config, param groups)."""
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, dict] = {}
        groups = []
        for k, opt in enumerate(self.optimizers):
            state = opt.state_dict()
            groups.append(state["param_groups"])
            for idx, values in state["state"].items():
                for name, value in values.items():
                    if isinstance(value, Tensor):  # a copy: StiefelAdam's moments are views of one tensor
                        tensors[f"optimizer.{k}.{idx}.{name}"] = value.detach().to("cpu", copy=True)
                    else:
                        scalars.setdefault(f"{k}.{idx}", {})[name] = value
        meta = {
            "step": str(self.step),
            "losses": json.dumps(self.losses),
            "config": json.dumps(asdict(self.config)),
            "param_groups": json.dumps(groups),
            "scalars": json.dumps(scalars),
        }
        return tensors, meta

    def load_state_tensors(self, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
        """Restore what :meth:`state_tensors` produced (same adapters, same method)."""
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta["scalars"])
        if len(groups) != len(self.optimizers):
            raise ValueError("the saved optimizer state belongs to another method or layer set")
        for k, opt in enumerate(self.optimizers):
            # keep this optimizer's kernels (fused or foreach), whichever the saving one used; a
            # count mismatch is load_state_dict's to report
            kernels = [{key: g[key] for key in ("fused", "foreach") if key in g} for g in opt.param_groups]
            saved_groups = [{**saved, **mine} for saved, mine in zip(groups[k], kernels, strict=False)]
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                _, opt_k, idx, name = key.split(".", 3)
                if int(opt_k) == k:
                    state.setdefault(int(idx), {})[name] = value
            for key, values in scalars.items():
                opt_k, idx = key.split(".")
                if int(opt_k) == k:
                    state.setdefault(int(idx), {}).update(values)
            try:
                opt.load_state_dict({"state": state, "param_groups": saved_groups})
            except (ValueError, KeyError) as err:
                raise ValueError(f"the saved optimizer state does not fit these adapters: {err}") from None
        self.step = int(meta["step"])
        self.losses = json.loads(meta["losses"])

    def save_state(self, path, *, overwrite: bool = False) -> None:
        tensors, meta = self.state_tensors()
        write_safetensors(path, tensors, meta, overwrite=overwrite)

    def load_state(self, path) -> None:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        self.load_state_tensors(load_file(str(path)), meta)
