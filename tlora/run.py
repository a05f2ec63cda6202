"""A training run's files: the adapter file and, beside it, the optimizer state it resumes
from (``<name>.tlora-state``) and the loss log (``<name>.loss.csv``); their metadata; saving;
resuming. Host-free: the node and the command line hand in the adapters, the trainer and where
to save.

The two files are written one after the other (each atomically), so a crash between the two
renames leaves a pair from different saves. Both carry the run's id and the step
(``tlora.run_id``; ``tlora.steps`` / ``step``), and :func:`resume` takes them only as a pair from
one save (or the adapter alone, with a fresh optimizer, when asked: ``resume_adapter_only``)."""

from __future__ import annotations

import datetime
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter
from .format import build_adapter, load_adapter_file, load_tensors, save_adapters, write_safetensors
from .options import TrainingOptions
from .train import NonFiniteLossError, NonFiniteWeightsError, Trainer
from .validate import AdapterFileError, all_finite, check_finite, read_header

log = logging.getLogger("comfyui-tlora")
STATE_SUFFIX = ".tlora-state"
RUN_ID_KEY = "tlora.run_id"  # in both files' metadata: which run wrote them
LOCAL_OPTIONS = (  # about this machine's files: not written into them
    "output_name",
    "resume_from",
    "overwrite",
    "resume_adapter_only",
)
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


def fit_batch(options: TrainingOptions, images: int) -> TrainingOptions:
    """``options`` with ``batch_size`` at most the number of training ``images`` (a warning
    says so), so that the file records the batch that was really trained."""
    if options.batch_size <= images:
        return options
    log.warning(
        "batch_size %d is larger than the %d training images: training at batch size %d (recorded in the file)",
        options.batch_size,
        images,
        images,
    )
    return options.replace(batch_size=images)


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
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def save(self, interrupted: bool = False) -> Path | None:
        """Write the adapter file, then its optimizer state, both marked with this run and step.
        Refuses (:class:`NonFiniteWeightsError`) to write weights that are not all finite."""
        if self.path is None:
            return None
        step = self.trainer.step
        if not all_finite(self.trainer.parameters()):
            raise NonFiniteWeightsError(f"the adapter weights at step {step} are NaN or infinite; not saved")
        meta = {
            **self.metadata,
            "tlora.steps": str(step),
            "tlora.interrupted": str(interrupted).lower(),
            RUN_ID_KEY: self.run_id,
        }
        save_adapters(self.path, self.adapters, meta, overwrite=True)
        tensors, state_meta = self.trainer.state_tensors()
        write_safetensors(state_path(self.path), tensors, {**state_meta, RUN_ID_KEY: self.run_id}, overwrite=True)
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
        """Every save of this run had finite weights (:meth:`save` refuses others), so the last
        one is good."""
        kept = (
            f"the last good save is {self.path.name} (step {self.last_save_step})"
            if self.last_save_step and self.path is not None
            else "nothing was saved by this run"
        )
        return f"training stopped: {err}; {kept}. Lower the learning rate, or train in fp32."


def pair_problem(path: Path, adapter_meta: Mapping[str, str], state_meta: Mapping[str, str]) -> str | None:
    """Why the adapter file ``path`` and its optimizer state are not from one save, or None.
    Files written before run ids were recorded are compared by step alone."""
    state = state_path(path)
    adapter_step, state_step = adapter_meta.get("tlora.steps"), state_meta.get("step")
    adapter_run, state_run = adapter_meta.get(RUN_ID_KEY), state_meta.get(RUN_ID_KEY)
    if adapter_step is not None and state_step is not None and adapter_step != state_step:
        steps = (adapter_step, state_step)
        older = path.name if all(s.isdigit() for s in steps) and int(adapter_step) < int(state_step) else state.name
        return (
            f"{path.name} is at step {adapter_step} but its optimizer state {state.name} at step {state_step}: "
            f"{older} is older (a save was interrupted between the two files)"
        )
    if adapter_run and state_run and adapter_run != state_run:
        return f"{path.name} and its optimizer state {state.name} were written by different training runs"
    return None


def saved_step(path: Path, metadata: Mapping[str, str]) -> int:
    value = metadata.get("tlora.steps", "0")
    if not value.isdigit():
        raise AdapterFileError(f"{path.name}: tlora.steps is {value!r}, not a step count")
    return int(value)


@torch.no_grad()
def resume(path: Path, adapters: dict[str, Adapter], trainer: Trainer) -> None:
    """Load the adapters saved in ``path`` into ``adapters`` and the optimizer state beside it
    into ``trainer``, only as a pair from one save. With ``resume_adapter_only`` set, or
    without a state file: the saved step and a fresh optimizer (with a warning)."""
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
    step = saved_step(path, file.metadata)
    state = state_path(path)
    alone = trainer.config.resume_adapter_only or not state.exists()
    state_tensors, state_meta = ({}, {}) if alone else read_state(path, file.metadata)
    for module, adapter in adapters.items():
        try:
            saved = build_adapter(adapter.weight_shape, file.modules[module], f"{path.name}: {module}")
            adapter.load_state_dict(saved.state_dict())
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"resume file {path.name} does not fit this model ({module}: {err})") from None
    if not alone:
        try:
            trainer.load_state_tensors(state_tensors, state_meta)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:  # another layout
            raise ValueError(f"{state.name} does not fit this run: {err!r}") from None
        return
    trainer.step = step
    why = "resume_adapter_only is set" if state.exists() else f"{path.name} has no optimizer state beside it"
    log.warning("%s: resuming %s at step %d with a fresh optimizer", why, path.name, step)


def read_state(path: Path, adapter_meta: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimizer state beside the adapter file ``path``: readable, from the same save as
    the adapter (:func:`pair_problem`), finite. Raises ValueError saying what to do."""
    state = state_path(path)
    header = read_header(state)  # a truncated or foreign file: AdapterFileError naming it
    problem = pair_problem(path, adapter_meta, header.metadata)
    if problem:
        raise ValueError(
            f"{problem}. Resuming from that pair would not continue either save. Resume the adapter alone "
            "with a fresh optimizer (set resume_adapter_only), or pick a file whose pair is complete."
        )
    tensors = load_tensors(state)
    check_finite(tensors, state.name)
    return tensors, header.metadata
