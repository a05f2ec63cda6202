"""A training run's files: the adapter file and, beside it, the optimizer state it resumes
from (``<name>.tlora-state``) and the loss log (``<name>.loss.csv``); their metadata; saving;
resuming. Host-free: the node and the command line hand in the adapters, the trainer and where
to save."""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter
from .format import build_adapter, load_adapter_file, save_adapters
from .options import TrainingOptions
from .train import NonFiniteLossError, Trainer

log = logging.getLogger("comfyui-tlora")
STATE_SUFFIX = ".tlora-state"
LOCAL_OPTIONS = ("output_name", "resume_from", "overwrite")  # about this machine's files: not written into them
LOSS_LOG_SUFFIX = ".loss.csv"
LOSS_LOG_HEADER = "step,loss,lr,time"


def state_path(adapter_path: Path) -> Path:
    """The optimizer-state file kept beside an adapter file, for resuming."""
    return adapter_path.with_name(adapter_path.name + STATE_SUFFIX)


def loss_log_path(adapter_path: Path) -> Path:
    """The loss log kept beside an adapter file: a CSV row per step (:data:`LOSS_LOG_HEADER`)."""
    return adapter_path.with_suffix(LOSS_LOG_SUFFIX)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the loss log and the progress display see it."""

    step: int  # steps done, 1-based
    loss: float  # the step's mean loss (over micro-batches and ranks)
    lr: float  # the learning rate the step used (SODA's rotations: scaled alike)
    time: float  # when it ended, seconds since the epoch

    def csv_row(self) -> str:
        return f"{self.step},{self.loss:.8g},{self.lr:.8g},{self.time:.3f}"


def start_loss_log(path: Path, first_step: int) -> None:
    """Make ``path`` a loss log a run continues at ``first_step``: keep the rows of earlier steps
    (a resumed run; rows past the resumed step came from a run that went on without saving),
    drop the rest, or start with the header alone."""
    rows = []
    if first_step > 1 and path.is_file():
        lines = path.read_text().splitlines()
        if lines[:1] == [LOSS_LOG_HEADER]:
            rows = [line for line in lines[1:] if int(line.split(",", 1)[0]) < first_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([LOSS_LOG_HEADER, *rows]) + "\n")


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
    on_step: Callable[[StepRecord], None] | None = None  # e.g. the command line's progress display
    last_save_step: int = 0
    _log_started: bool = field(default=False, repr=False)

    def save(self, interrupted: bool = False) -> Path | None:
        if self.path is None:
            return None
        step = self.trainer.step
        meta = {**self.metadata, "tlora.steps": str(step), "tlora.interrupted": str(interrupted).lower()}
        save_adapters(self.path, self.adapters, meta, overwrite=True)
        self.trainer.save_state(state_path(self.path), overwrite=True)
        self.last_save_step = step
        return self.path

    def log_step(self, loss: float) -> StepRecord:
        """After each optimizer step: a row in the loss log beside the adapter, then ``on_step``."""
        cfg, step = self.trainer.config, self.trainer.step
        record = StepRecord(step, loss, cfg.learning_rate * cfg.lr_factor(step - 1), time.time())
        if self.path is not None:
            log = loss_log_path(self.path)
            if not self._log_started:
                start_loss_log(log, step)
                self._log_started = True
            with log.open("a") as f:
                f.write(record.csv_row() + "\n")
        if self.on_step is not None:
            self.on_step(record)
        return record

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
