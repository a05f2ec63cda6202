"""A training run's files: the adapter file and, beside it, the optimizer state it resumes
from (``<name>.tlora-state``); their metadata; saving; resuming. Host-free: the node and the
command line hand in the adapters, the trainer and where to save."""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .adapters import Adapter
from .format import build_adapter, load_adapter_file, save_adapters
from .options import TrainingOptions
from .train import NonFiniteLossError, Trainer

log = logging.getLogger("comfyui-tlora")
STATE_SUFFIX = ".tlora-state"
LOCAL_OPTIONS = ("output_name", "resume_from", "overwrite")  # about this machine's files: not written into them


def state_path(adapter_path: Path) -> Path:
    """The optimizer-state file kept beside an adapter file, for resuming."""
    return adapter_path.with_name(adapter_path.name + STATE_SUFFIX)


def training_metadata(
    options: TrainingOptions, adapters: dict[str, Adapter], architecture: str, title: str
) -> dict[str, str]:
    """The header of a trained adapter file: ``modelspec.*`` for model browsers, ``tlora.*`` for
    this pack (the options in full under ``tlora.training``)."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{options.method}",
        "modelspec.implementation": "comfyui-tlora",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tlora.method": options.method,
        "tlora.transform_rank": str(options.transform_rank),
        "tlora.residual_rank": str(options.residual_rank),
        "tlora.targets": json.dumps(list(options.target_groups)),
        "tlora.base_model": architecture,
        "tlora.parameters": str(sum(a.num_parameters() for a in adapters.values())),
        "tlora.training": json.dumps({k: v for k, v in asdict(options).items() if k not in LOCAL_OPTIONS}),
    }


@dataclass
class RunFiles:
    """Saves a run's adapters (with the trainer's state beside them) to ``path``; None: nothing is saved."""

    trainer: Trainer
    adapters: dict[str, Adapter]
    metadata: dict[str, str]
    path: Path | None
    last_save_step: int = 0

    def save(self, interrupted: bool = False) -> Path | None:
        if self.path is None:
            return None
        step = self.trainer.step
        meta = {**self.metadata, "tlora.steps": str(step), "tlora.interrupted": str(interrupted).lower()}
        save_adapters(self.path, self.adapters, meta, overwrite=True)
        self.trainer.save_state(state_path(self.path), overwrite=True)
        self.last_save_step = step
        return self.path

    def save_due(self) -> bool:
        """Whether ``save_every`` asks for a save after the step just taken (the end saves anyway)."""
        every, trainer = self.trainer.config.save_every, self.trainer
        return bool(every) and trainer.step % every == 0 and not trainer.done

    def stopped_message(self, err: NonFiniteLossError) -> str:
        kept = (
            f"the last good save is {self.path.name} (step {self.last_save_step})"
            if self.last_save_step and self.path is not None
            else "nothing was saved"
        )
        return f"training stopped: {err}; {kept}. Lower the learning rate, or train in fp32."


@torch.no_grad()
def resume(path: Path, adapters: dict[str, Adapter], trainer: Trainer) -> None:
    """Load the adapters saved in ``path`` into ``adapters`` and the optimizer state beside it
    into ``trainer`` (without one: the saved step, a fresh optimizer, and a warning)."""
    method = trainer.config.method
    file = load_adapter_file(path)
    made_with = file.metadata.get("tlora.method")
    if made_with and made_with != method:
        raise ValueError(
            f"resume file {path.name} was trained with {made_with!r}, not {method!r}: pick the same method"
        )
    missing = sorted(set(adapters) - set(file.modules))
    if missing or set(file.modules) - set(adapters):
        raise ValueError(
            f"resume file {path.name} covers other layers than this run ({len(missing)} missing, e.g. "
            f"{missing[:2]}): use the same model and target layers"
        )
    for module, adapter in adapters.items():
        try:
            saved = build_adapter(adapter.weight_shape, file.modules[module])
            adapter.load_state_dict(saved.state_dict())
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"resume file {path.name} does not fit this model ({module}: {err})") from None
    state = state_path(path)
    if state.exists():
        trainer.load_state(state)
    else:
        trainer.step = int(file.metadata.get("tlora.steps", 0))
        log.warning(
            "%s has no optimizer state beside it; resuming at step %d with a fresh optimizer", path.name, trainer.step
        )
