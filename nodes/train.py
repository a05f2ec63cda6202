"""Train TLoRA: train TLoRA / SODA / LoRA adapters on a model inside ComfyUI.

:func:`train` builds a run from :class:`tlora.options.TrainingOptions` and is shared by the node and
the command line (nodes/headless.py); the node's inputs are generated from the same dataclass.
The loop itself runs inside ComfyUI's sampler (nodes/sampling.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.patcher_extension
import comfy.sd
import comfy_extras.nodes_custom_sampler
import torch
from comfy_api.latest import io

from ..tlora.dataset import bucket_table, group_by_shape, per_image
from ..tlora.format import module_tensors
from ..tlora.memory import gib
from ..tlora.model import (
    attached,
    checkpointed_blocks,
    is_plain_weight,
    make_adapters,
    norms_on_copies,
    recomputed_in_backward,
    release_inference_tensors,
    select_modules,
)
from ..tlora.options import NO_RESUME, TrainingOptions
from ..tlora.run import RunFiles, fit_batch, resume, training_metadata
from ..tlora.targets import TEXT_ENCODER_GROUPS
from ..tlora.train import NonFiniteLossError, Trainer
from .apply import architecture_names, architecture_of
from .compat import dequantized_weight, training_mode
from .folders import (
    TRAINING_CATEGORY,
    adapter_file_problem,
    output_path,
    output_problem,
    resolve_adapter_path,
)
from .memory import MEMORY_ADVICE, WeightBudget, casting_layers, casts, check_memory, run_memory
from .option_inputs import NODE_OPTIONS, RESUME_NONE, option_input
from .sampling import TrainingLoop, TrainingSampler

log = logging.getLogger("comfyui-tlora")


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
    latents: dict | list,
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
    the patched model and more. ``latents``: a LATENT, or a list of them of any sizes (aspect-ratio
    buckets, videos of other frame counts): grouped by shape, each micro-batch from one group. The
    text comes as ``positive`` conditioning, or as ``captions`` encoded by ``clip`` (needed to train
    the text encoder), one for all images or one per image in the order of ``latents``. ``sync``: the
    trainer's per-step exchange (tlora.distributed.DataParallel); ``on_step``: called with each step's
    StepRecord."""
    batches = latent_batches(latents)
    count = sum(b.shape[0] for b in batches)
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
    buckets, order = group_by_shape(batches)
    if has_text:
        captions = [per_image(captions, count, "captions")[i] for i in order]
    else:
        positive = [per_image(positive, count, "conditionings")[i] for i in order]
    if len(buckets) > 1:
        log.info("training on %s", bucket_table([tuple(b.shape[1:]) for b in buckets], [len(b) for b in buckets]))
    samples = max(buckets, key=lambda b: b[0].numel())  # the largest: what the sampler and the estimate size for
    if output is not None and output.exists() and not options.overwrite and output != resume_path:
        raise ValueError(
            f"{output.name} already exists in {output.parent}: choose another output name or enable overwrite"
        )

    mp = model.clone()
    te = clip.clone() if has_text else None
    with torch.inference_mode(False), torch.enable_grad():
        patchers = [mp, te.patcher] if text_groups else [mp]  # a frozen text encoder only encodes, once
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
        device = mp.load_device
        need = run_memory(mp, patchers, modules, samples, options)
        check_memory(need, device)
        budget = WeightBudget(need.floor, options.max_weight_memory)
        comfy.model_management.load_models_gpu(patchers, memory_required=need.floor, force_full_load=False)
        offloaded = budget.fit(mp)
        mp.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "tlora.train", budget.wrapper)
        for patcher in patchers:
            release_inference_tensors(patcher.model)
            patcher.model.requires_grad_(False)
        quantized = sorted(n for n, m in modules.items() if not is_plain_weight(m.weight))
        bypass = options.bypass_mode or bool(quantized) or offloaded
        if quantized:
            log.info("%d layers have fp8 or quantized weights (e.g. %s): bypass mode", len(quantized), quantized[0])
        if offloaded:
            log.info(
                "%s of %s of model weights on %s, the rest streamed from system memory at each step: bypass mode",
                gib(mp.loaded_size()),
                gib(mp.model_size()),
                device,
            )
        adapters = make_adapters(
            modules,
            options.method,
            seed=options.seed,
            weight_of=(lambda m: dequantized_weight(m, device)) if bypass else None,
            **options.adapter_options,
        )
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
        loop = TrainingLoop(files, positive, text, node_id, preview_vae, buckets=buckets if len(buckets) > 1 else None)
        guider = comfy_extras.nodes_custom_sampler.Guider_Basic(mp)
        guider.set_conds(positive)  # what the guider prepares with; each step's come from the loop's conditioner
        try:
            with (
                recomputed_in_backward(casting_layers(patchers), when=casts) if bypass else contextlib.nullcontext(),
                attached(modules, adapters, bypass=bypass, weight_of=dequantized_weight),
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
        except torch.OutOfMemoryError:
            saved = files.save(interrupted=True)
            raise ValueError(
                f"out of memory on {device} at step {trainer.step}{f' (saved to {saved})' if saved else ''}; the run "
                f"was estimated at {gib(need.floor)} with weights offloaded ({need.describe()}). "
                f"{MEMORY_ADVICE}"
            ) from None
        for adapter in adapters.values():
            adapter.requires_grad_(False)
        saved = files.save()
        tensors = module_tensors(adapters)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 1.0)  # as Apply TLoRA does
    return TrainResult(new_model, new_clip, tensors, list(trainer.losses), saved, trainer.step)


def latent_batches(latents) -> list[torch.Tensor]:
    """The latent batches of a LATENT or a list of them (what ComfyUI hands a list input)."""
    items = latents if isinstance(latents, list) else [latents]
    batches = [item["samples"] if isinstance(item, dict) else item for item in items]
    if not batches or any(b is None or b.ndim < 4 for b in batches) or not sum(b.shape[0] for b in batches):
        raise ValueError("no training images: connect latents of at least one image (VAE Encode your images)")
    return [b.detach() for b in batches if b.shape[0]]


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
                io.Latent.Input(
                    "latents",
                    tooltip="VAE-encoded training images: one batch, or one per aspect-ratio bucket (Load Training "
                    "Images' buckets through VAE Encode); each micro-batch comes from one size.",
                ),
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
            is_input_list=True,  # every input comes as a list: latents (and captions) one item per bucket
        )

    @classmethod
    def validate_inputs(cls, output_name=None, resume_from=RESUME_NONE) -> bool | str:
        """Checked when the prompt is queued, before any node (the checkpoint loader too) runs;
        a linked ``output_name`` (None here) is checked when the node runs. ComfyUI hands each value
        as a one-item list (``is_input_list``)."""
        output_name, resume_from = (v[0] if isinstance(v, list) else v for v in (output_name, resume_from))
        name_problem = output_name is not None and output_problem(output_name)
        resume_problem = resume_from != RESUME_NONE and adapter_file_problem(resume_from)
        return name_problem or resume_problem or True

    @classmethod
    def execute(cls, model, latents, positive=None, clip=None, captions=None, preview_vae=None, **values):
        """Each argument is a list (``is_input_list``): latents and captions one item per bucket,
        conditionings laid end to end, every other input its first item."""
        model, clip, preview_vae = (None if not v else v[0] for v in (model, clip, preview_vae))
        values = {name: value[0] for name, value in values.items()}
        positive = [entry for conditioning in positive for entry in conditioning] if positive else None
        resume_from = values.get("resume_from", RESUME_NONE)
        values["resume_from"] = NO_RESUME if resume_from == RESUME_NONE else resume_from
        options = TrainingOptions(**values)
        lines = [line.strip() for text in captions or [] for line in text.splitlines() if line.strip()]
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
