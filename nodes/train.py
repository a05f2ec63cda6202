"""Train TLoRA: train TLoRA / SODA / LoRA adapters on a model inside ComfyUI.

:func:`train` builds a run from :class:`tlora.options.TrainingOptions` and is shared by the node and
the command line (nodes/headless.py); the node's inputs are generated from the same dataclass.
The loop itself runs inside ComfyUI's sampler (nodes/sampling.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy_extras.nodes_custom_sampler
import torch
from comfy_api.latest import io

from ..tlora.dataset import per_image
from ..tlora.format import module_tensors
from ..tlora.model import (
    attached,
    checkpointed_blocks,
    make_adapters,
    norms_on_copies,
    release_inference_tensors,
    select_modules,
)
from ..tlora.options import NO_RESUME, TrainingOptions
from ..tlora.run import RunFiles, fit_batch, resume, training_metadata
from ..tlora.targets import TEXT_ENCODER_GROUPS
from ..tlora.train import NonFiniteLossError, Trainer
from .apply import architecture_names, architecture_of
from .compat import training_mode
from .folders import (
    TRAINING_CATEGORY,
    adapter_file_problem,
    adapter_files,
    output_path,
    output_problem,
    resolve_adapter_path,
)
from .sampling import TrainingLoop, TrainingSampler

log = logging.getLogger("comfyui-tlora")
RESUME_NONE = "(none)"  # the node's resume_from choice for "start fresh"


@dataclass
class TrainResult:
    model: object
    clip: object | None
    tensors: dict[str, torch.Tensor]
    losses: list[float]
    path: Path | None
    steps: int


def train(
    model,
    latents: dict,
    options: TrainingOptions,
    *,
    positive: list | None = None,
    clip=None,
    captions: list[str] | None = None,
    output: Path | None = None,
    resume_path: Path | None = None,
    node_id: str | None = None,
    preview_vae=None,
    sync=None,
    on_step=None,
) -> TrainResult:
    """Train adapters on ``model`` (a ComfyUI MODEL; ``clip`` too when the targets name
    text-encoder groups), save them to ``output`` (None: keep them in memory only) and return
    the patched model and more. The text comes as ``positive`` conditioning, or as ``captions``
    encoded by ``clip`` (needed to train the text encoder). ``sync``: the trainer's per-step
    exchange (tlora.distributed.DataParallel); ``on_step``: called with each step's StepRecord."""
    samples = latents["samples"] if isinstance(latents, dict) else latents
    if samples is None or samples.ndim < 4 or samples.shape[0] == 0:
        raise ValueError("no training images: connect latents of at least one image (VAE Encode your images)")
    count = samples.shape[0]
    options = fit_batch(options, count)
    text_groups = [t for t in options.target_groups if t in TEXT_ENCODER_GROUPS]
    has_text = clip is not None and bool(captions)
    if text_groups and not has_text:
        raise ValueError(
            "training the text encoder needs the CLIP and the captions as text: connect clip and captions "
            "(e.g. from Load Training Images (TLoRA))"
        )
    if not has_text and not positive:
        raise ValueError("no captions: connect positive conditioning, or clip + captions")
    if has_text:
        captions = per_image(captions, count, "captions")
    else:
        positive = per_image(positive, count, "conditionings")
    if output is not None and output.exists() and not options.overwrite and output != resume_path:
        raise ValueError(
            f"{output.name} already exists in {output.parent}: choose another output name or enable overwrite"
        )

    mp = model.clone()
    te = clip.clone() if has_text else None
    with torch.inference_mode(False), torch.enable_grad():
        patchers = [mp, te.patcher] if text_groups else [mp]  # a frozen text encoder only encodes, once
        comfy.model_management.load_models_gpu(patchers, memory_required=1e20, force_full_load=True)
        for patcher in patchers:
            release_inference_tensors(patcher.model)
            patcher.model.requires_grad_(False)
        diffusion = mp.model.diffusion_model
        unet_groups = [t for t in options.target_groups if t not in TEXT_ENCODER_GROUPS]
        selected = select_modules(diffusion, unet_groups, architecture=architecture_names(model))
        modules = {f"diffusion_model.{n}": m for n, m in selected.items()}
        if text_groups:
            text_modules = select_modules(te.cond_stage_model, text_groups)
            if not text_modules:
                raise ValueError(f"no layer of this text encoder matches the target groups {text_groups}")
            modules.update({f"text_encoders.{n}": m for n, m in text_modules.items()})
        if not modules:
            raise ValueError(
                f"no layer of this {architecture_of(model)} model matches the targets {list(options.target_groups)}"
            )
        adapters = make_adapters(modules, options.method, seed=options.seed, **options.adapter_options)
        trainer = Trainer(adapters, options, sync=sync)
        if resume_path is not None:
            resume(resume_path, adapters, trainer)
        if trainer.done:
            raise ValueError(f"the resumed adapter is already at step {trainer.step}; set steps above that")
        metadata = training_metadata(options, adapters, architecture_of(model), output.stem if output else "tlora")
        text = None
        if has_text:
            tokens = [te.tokenize(caption) for caption in captions]
            with torch.no_grad():  # frozen text encoder: encode once; trained: the guider's initial conds
                first = tokens if not text_groups else tokens[:1]
                positive = [e for t in first for e in te.encode_from_tokens_scheduled(t, show_pbar=False)]
            text = (te, tokens) if text_groups else None
        files = RunFiles(trainer, adapters, metadata, output, on_step)
        loop = TrainingLoop(files, positive, text, node_id, preview_vae)
        guider = comfy_extras.nodes_custom_sampler.Guider_Basic(mp)
        guider.set_conds(positive)  # what the guider prepares with; each step's come from the loop's conditioner
        try:
            with (
                attached(modules, adapters),
                training_mode(),
                checkpointed_blocks(diffusion) if options.gradient_checkpointing else contextlib.nullcontext(),
                norms_on_copies(diffusion),  # Flux adds residuals in place after its norms read them
                norms_on_copies(te.cond_stage_model) if text is not None else contextlib.nullcontext(),
            ):
                dummy_sigmas = torch.arange(count)  # carries the dataset size, as ComfyUI's trainer does
                guider.sample(
                    torch.zeros_like(samples), samples, TrainingSampler(loop), dummy_sigmas, seed=options.seed
                )
        except comfy.model_management.InterruptProcessingException:
            saved = files.save(interrupted=True)
            log.warning("training cancelled at step %d%s", trainer.step, f"; saved to {saved}" if saved else "")
            raise
        except NonFiniteLossError as err:
            raise ValueError(files.stopped_message(err)) from None
        for adapter in adapters.values():
            adapter.requires_grad_(False)
        saved = files.save()
        tensors = module_tensors(adapters)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 1.0)  # as Apply TLoRA does
    return TrainResult(new_model, new_clip, tensors, list(trainer.losses), saved, trainer.step)


def option_input(f: dataclasses.Field) -> io.Input:
    """The node input of one training option (widget kind, default, bounds, tooltip)."""
    meta = f.metadata
    common = {"tooltip": meta["help"] or None, "optional": meta["optional"]}
    if f.name == "resume_from":
        return io.Combo.Input(f.name, options=[RESUME_NONE, *adapter_files()], default=RESUME_NONE, **common)
    if meta["choices"]:
        return io.Combo.Input(f.name, options=list(meta["choices"]), default=f.default, **common)
    if f.type == "bool":
        return io.Boolean.Input(f.name, default=f.default, **common)
    if f.type == "int":
        extra = {"control_after_generate": True} if f.name == "seed" else {}
        return io.Int.Input(f.name, default=f.default, min=meta["min"], max=meta["max"], **extra, **common)
    if f.type == "float":
        return io.Float.Input(f.name, default=f.default, min=meta["min"], max=meta["max"], step=meta["step"], **common)
    return io.String.Input(f.name, default=f.default, **common)


NODE_OPTIONS = [f for f in dataclasses.fields(TrainingOptions) if f.metadata["node"]]


class TrainTLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATrain",
            display_name="Train TLoRA",
            category=TRAINING_CATEGORY,
            description="Train a TLoRA, SODA or LoRA adapter on latents + conditioning (or clip + captions, which "
            "can also train the text encoder). Saves to the loras folder; Cancel stops within a step and saves "
            "what was trained.",
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("latents", tooltip="VAE-encoded training images (one batch)."),
                io.Conditioning.Input(
                    "positive",
                    optional=True,
                    tooltip="One caption for all images, or one per image. Not needed with clip + captions.",
                ),
                *(option_input(f) for f in NODE_OPTIONS),
                io.Clip.Input("clip", optional=True, tooltip="Encodes the captions; needed to train the text encoder."),
                io.String.Input(
                    "captions",
                    multiline=True,
                    force_input=True,
                    optional=True,
                    tooltip="One caption per line: one for all images, or one per image (Load Training Images).",
                ),
                io.Vae.Input("preview_vae", optional=True, tooltip="Decodes the previews (else a rough preview)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.LoraModel.Output(display_name="adapter"),
                io.LossMap.Output(display_name="loss"),
                io.String.Output(display_name="path"),
                io.Clip.Output(display_name="CLIP"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, output_name=None, resume_from=RESUME_NONE) -> bool | str:
        """Checked when the prompt is queued, before any node (the checkpoint loader too) runs;
        a linked ``output_name`` (None here) is checked when the node runs."""
        name_problem = output_name is not None and output_problem(output_name)
        resume_problem = resume_from != RESUME_NONE and adapter_file_problem(resume_from)
        return name_problem or resume_problem or True

    @classmethod
    def execute(cls, model, latents, positive=None, clip=None, captions=None, preview_vae=None, **values):
        resume_from = values.get("resume_from", RESUME_NONE)
        values["resume_from"] = NO_RESUME if resume_from == RESUME_NONE else resume_from
        options = TrainingOptions(**values)
        lines = [line.strip() for line in (captions or "").splitlines() if line.strip()]
        result = train(
            model,
            latents,
            options,
            positive=positive,
            clip=clip,
            captions=lines,
            output=output_path(options.output_name),
            resume_path=resolve_adapter_path(options.resume_from) if options.resume_from else None,
            node_id=cls.hidden.unique_id if cls.hidden else None,
            preview_vae=preview_vae,
        )
        path = str(result.path or "")
        return io.NodeOutput(result.model, result.tensors, {"loss": result.losses}, path, result.clip)


NODES = [TrainTLoRA]
