"""Train TLoRA: train TLoRA / SODA / LoRA adapters on a model inside ComfyUI.

The model is driven through ComfyUI's own sampling machinery (a Guider and a Sampler, as
ComfyUI's Train LoRA node does), so every model family ComfyUI loads trains through the same
code. The loss is the model's own prediction target (ε, v or flow): ComfyUI hands back the
denoised estimate ``x̂0 = a(σ, x) + c_out(σ)·F(x)``, and ``(x̂0 − x0) / c_out`` is exactly the
error of the raw prediction F against its target. The optimization itself is
:class:`tlora.train.Trainer`; adapted layers run each on its cheapest path (tlora.cost).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.utils
import comfy_extras.nodes_custom_sampler
import folder_paths
import latent_preview
import torch
import torch.utils.checkpoint
from comfy_api.latest import io
from comfy_extras.nodes_train import make_batch_extra_option_dict

from ..tlora.batched import prepared
from ..tlora.format import build_adapter, load_adapter_file, module_tensors, save_adapters
from ..tlora.model import METHODS, TARGET_GROUPS, TEXT_ENCODER_GROUPS, attach, bypassed, make_adapters, select_modules
from ..tlora.train import NonFiniteLossError, TrainConfig, Trainer, dco_loss, step_generator
from .apply import LORA_FOLDER, adapter_files, architecture_of, resolve_adapter_path

log = logging.getLogger("comfyui-tlora")
STATE_SUFFIX = ".tlora-state"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREVIEW_STEPS = 12  # Euler steps of a training preview


@dataclass
class AdapterSpec:
    """What to train: the method, its ranks and which layers."""

    method: str = "tlora"
    transform_rank: int = 2
    residual_rank: int = 6
    regularizer: str = "none"
    regularizer_weight: float = 0.0
    targets: tuple[str, ...] = ("attention",)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        if unknown or not self.targets:
            raise ValueError(
                f"unknown target group(s) {unknown or '(none given)'}; choose from {sorted(TARGET_GROUPS)}"
            )


@dataclass
class RunOptions:
    """How to run: precision, memory, saving, resuming."""

    training_dtype: str = "fp32"
    gradient_checkpointing: bool = False
    save_every: int = 0
    output_path: Path | None = None
    overwrite: bool = False
    resume_path: Path | None = None
    node_id: str | None = None
    preview_every: int = 0
    preview_vae: object | None = None
    batched_factors: bool | None = None  # build same-shaped layers' factors together; None: on CUDA
    extra_metadata: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    model: object
    clip: object | None
    tensors: dict[str, torch.Tensor]
    losses: list[float]
    path: Path | None
    steps: int


def state_path(adapter_path: Path) -> Path:
    """The optimizer-state file kept beside an adapter file, for resuming."""
    return adapter_path.with_name(adapter_path.name + STATE_SUFFIX)


def output_path(name: str) -> Path:
    """Where an output name is saved: the first loras folder, ``.safetensors`` added."""
    name = name.strip()
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"output name {name!r} must be a plain relative name like 'my_subject_tlora'")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return Path(folder_paths.get_folder_paths(LORA_FOLDER)[0]) / name


def combine_conditioning(entries: list) -> list:
    """One ComfyUI conditioning entry ``[[cond [B, L, C], extras]]`` for a batch, from one entry
    ``[cond [1, L_i, C], extras_i]`` per image: token sequences repeated to a common length
    (as ComfyUI's CONDCrossAttn.concat does) and stacked, and so are per-image tensors such as
    ``pooled_output``. ComfyUI averages the predictions of separate entries over the whole
    batch, so a batch of separate entries would train every image on the mean of all captions."""
    conds = [cond for cond, _ in entries]
    length = math.lcm(*(c.shape[1] for c in conds))
    cond = torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])
    extras = dict(entries[0][1])
    for key, value in extras.items():
        if isinstance(value, torch.Tensor) and all(isinstance(e[1].get(key), torch.Tensor) for e in entries):
            extras[key] = torch.cat([e[1][key] for e in entries])
    return [[cond, extras]]


@dataclass
class _Conditioner:
    """The conditioning of a batch of training images, processed as ComfyUI's guider would.
    With ``text`` (the CLIP and one tokenized caption per image), captions are encoded at every
    call, so adapters on the text encoder train; otherwise ``positive`` holds one entry per image."""

    inner_model: object
    positive: list | None
    text: tuple[object, list] | None
    seed: int

    def __call__(self, idx: list[int], x0: torch.Tensor) -> list[dict]:
        if self.text is not None:
            clip, tokens = self.text
            entries = [e for i in idx for e in clip.encode_from_tokens_scheduled(tokens[i], show_pbar=False)]
        else:
            entries = [self.positive[i] for i in idx]
        if len(entries) != len(idx):
            raise ValueError("scheduled (hooked) text encoders are not supported for training: remove the CLIP hooks")
        conds = {"positive": comfy.sampler_helpers.convert_cond(combine_conditioning(entries))}
        return comfy.samplers.process_conds(self.inner_model, x0, conds, x0.device, latent_image=x0, seed=self.seed)[
            "positive"
        ]


class _TrainingSampler(comfy.samplers.Sampler):
    """Receives ComfyUI's prepared model wrapper, then runs the training."""

    def __init__(self, run: _TrainingRun):
        self.run = run

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        self.run.loop(model_wrap, extra_args, latent_image)
        return torch.zeros_like(latent_image)


@dataclass
class _TrainingRun:
    trainer: Trainer
    options: RunOptions
    metadata: dict
    adapters_by_module: dict
    positive: list | None
    text: tuple[object, list] | None
    last_save_step: int = 0

    def micro_loss(self, model_wrap, extra_args, latents, conditioner: _Conditioner):
        cfg = self.trainer.config
        sampling = model_wrap.inner_model.model_sampling
        count = latents.shape[0]
        dtype = DTYPES[self.options.training_dtype]
        device = latents.device
        batched = self.options.batched_factors
        batched = device.type == "cuda" if batched is None else batched

        def loss(step: int, micro: int) -> torch.Tensor:
            gen = step_generator(cfg.seed, step, micro)
            idx = torch.randperm(count, generator=gen)[: cfg.batch_size].tolist()
            x0 = latents[idx].float()
            percents = torch.rand(len(idx), generator=gen)
            sigma = torch.tensor([float(sampling.percent_to_sigma(p.item())) for p in percents], device=device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            xt = sampling.noise_scaling(sigma, noise, x0, False)
            c_out = sampling.calculate_denoised(sigma, torch.ones_like(xt), torch.zeros_like(xt))
            extra = make_batch_extra_option_dict(extra_args, idx, full_size=count)

            def prediction_error(adapters) -> torch.Tensor:
                autocast = dtype != torch.float32
                with (
                    torch.autocast(device.type, dtype=dtype, enabled=autocast),
                    prepared(adapters, dtype if autocast else None) if batched else contextlib.nullcontext(),
                ):
                    model_wrap.conds["positive"] = conditioner(idx, x0)
                    denoised = model_wrap(xt, sigma, **extra)
                return ((denoised.float() - x0) / c_out).pow(2).mean(dim=tuple(range(1, x0.ndim)))

            error = prediction_error(self.trainer.adapters.values())
            if cfg.loss == "mse":
                return error.mean()
            with torch.no_grad(), bypassed(self.trainer.adapters.values()):
                reference = prediction_error(())  # the base model: text encoder and UNet unadapted
            return dco_loss(error, reference, cfg.dco_beta)

        return loss

    @torch.no_grad()
    def preview(self, model_wrap, extra_args, latents, conditioner: _Conditioner):
        """A cheap sample with the current adapters: the first image's caption, a fixed seed,
        Euler over PREVIEW_STEPS sigmas; decoded by the VAE if one is given, else by ComfyUI's
        latent-to-RGB previewer. Returns a PIL image."""
        sampling = model_wrap.inner_model.model_sampling
        device, dtype = latents.device, DTYPES[self.options.training_dtype]
        shape = (1, *latents.shape[1:])
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", PREVIEW_STEPS).to(device)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.trainer.config.seed)).to(device)
        x = sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), True)
        extra = make_batch_extra_option_dict(extra_args, [0], full_size=latents.shape[0])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model_wrap.conds["positive"] = conditioner([0], torch.zeros_like(noise))
            for sigma, next_sigma in itertools.pairwise(sigmas):
                denoised = model_wrap(x, sigma.expand(1), **extra).float()
                x = x + (x - denoised) / sigma * (next_sigma - sigma)
        x = sampling.inverse_noise_scaling(sigmas[-1], x)
        vae = self.options.preview_vae
        if vae is None:
            fmt = model_wrap.inner_model.latent_format
            return latent_preview.Latent2RGBPreviewer(
                fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias
            ).decode_latent_to_preview(x)
        pixels = vae.decode(model_wrap.inner_model.process_latent_out(x))[0].clamp(0, 1)
        return latent_preview.preview_to_image(pixels.reshape(-1, *pixels.shape[-3:])[0] * 2 - 1)

    def loop(self, model_wrap, extra_args, latents) -> None:
        cfg = self.trainer.config
        conditioner = _Conditioner(model_wrap.inner_model, self.positive, self.text, cfg.seed)
        micro_loss = self.micro_loss(model_wrap, extra_args, latents, conditioner)
        trainer, steps = self.trainer, cfg.steps
        bar = comfy.utils.ProgressBar(steps)
        bar.update_absolute(trainer.step, steps)
        start, first = time.perf_counter(), trainer.step
        every = self.options.preview_every
        while not trainer.done:
            comfy.model_management.throw_exception_if_processing_interrupted()
            loss = trainer.train_step(micro_loss)
            elapsed = time.perf_counter() - start
            eta = elapsed / (trainer.step - first) * (steps - trainer.step)
            preview = None
            if every and (trainer.step % every == 0 or trainer.done):
                preview = ("JPEG", self.preview(model_wrap, extra_args, latents, conditioner), 512)
            bar.update_absolute(trainer.step, steps, preview)
            send_progress(self.options.node_id, trainer.step, steps, loss, eta, preview is not None)
            save_every = self.options.save_every
            if save_every and trainer.step % save_every == 0 and trainer.step < steps:
                self.save()

    def save(self, interrupted: bool = False) -> Path | None:
        path = self.options.output_path
        if path is None:
            return None
        meta = {**self.metadata, "tlora.steps": str(self.trainer.step), "tlora.interrupted": str(interrupted).lower()}
        save_adapters(path, self.adapters_by_module, meta, overwrite=True)
        self.trainer.save_state(state_path(path), overwrite=True)
        self.last_save_step = self.trainer.step
        return path


def send_progress(node_id, step, steps, loss, eta, preview: bool = False) -> None:
    """Tell the UI (the pack's loss chart) how training goes; silent outside the server.
    ``preview``: a preview image of this step went out through ComfyUI's progress bar."""
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(
            "tlora.train.progress",
            {"node": node_id, "step": step, "steps": steps, "loss": loss, "eta": eta, "preview": preview},
        )
    except (ImportError, AttributeError):
        pass


@torch.no_grad()
def _load_resume(path: Path, adapters: dict, spec: AdapterSpec, trainer: Trainer) -> None:
    file = load_adapter_file(path)
    made_with = file.metadata.get("tlora.method")
    if made_with and made_with != spec.method:
        raise ValueError(
            f"resume file {path.name} was trained with {made_with!r}, not {spec.method!r}: pick the same method"
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


class _Checkpointed:
    """Gradient checkpointing of a diffusion model's blocks (each block's activations are
    recomputed in backward instead of stored)."""

    def __init__(self, diffusion_model: torch.nn.Module):
        self.blocks = [
            b
            for child in diffusion_model.children()
            for b in (child if isinstance(child, torch.nn.ModuleList) else [child])
        ]

    def __enter__(self):
        for block in self.blocks:
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: torch.utils.checkpoint.checkpoint(
                _f, *a, use_reentrant=False, **k
            )
        return self

    def __exit__(self, *exc):
        for block in self.blocks:
            block.__dict__.pop("forward", None)


@contextlib.contextmanager
def _norms_on_copies(model: torch.nn.Module):
    """Feed every LayerNorm of ``model`` a copy of its input. ComfyUI's text encoders add their
    residuals in place (``x += attn(norm(x))``), which overwrites the input the norm saved for
    backward; on a copy the text encoder trains, at the cost of one copy per norm."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    for norm in norms:
        norm.forward = lambda x, _f=norm.forward: _f(x.clone())
    try:
        yield
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)


def release_inference_tensors(model: torch.nn.Module) -> None:
    """Replace parameters and buffers created under ``torch.inference_mode`` (ComfyUI loads
    models inside it) by normal copies: autograd cannot save inference tensors for backward,
    and the frozen weights are needed there (∂L/∂x = ∂L/∂y · W)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference():
                module._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_inference():
                module._buffers[name] = buffer.clone()


def per_image(items: list, count: int, what: str) -> list:
    """``items`` as one per image: a single item is shared by all ``count`` images."""
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise ValueError(f"{len(items)} {what} for {count} images: give one for all images, or one per image")
    return list(items)


def train(
    model,
    latents: dict,
    positive: list | None,
    spec: AdapterSpec,
    config: TrainConfig,
    options: RunOptions,
    clip=None,
    captions: list[str] | None = None,
) -> TrainResult:
    """Train adapters on ``model`` (a ComfyUI MODEL; ``clip`` too when ``spec.targets`` names
    text-encoder groups) and return the patched model and more. The text comes as ``positive``
    conditioning, or as ``captions`` encoded by ``clip`` (needed to train the text encoder).
    Shared by the node and the command line."""
    samples = latents["samples"] if isinstance(latents, dict) else latents
    if samples is None or samples.ndim < 4 or samples.shape[0] == 0:
        raise ValueError("no training images: connect latents of at least one image (VAE Encode your images)")
    count = samples.shape[0]
    text_groups = [t for t in spec.targets if t in TEXT_ENCODER_GROUPS]
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
    if options.training_dtype not in DTYPES:
        raise ValueError(f"training_dtype must be one of {list(DTYPES)}")
    path = options.output_path
    if path is not None and path.exists() and not options.overwrite and path != options.resume_path:
        raise ValueError(f"{path.name} already exists in {path.parent}: choose another output name or enable overwrite")

    mp = model.clone()
    te = clip.clone() if has_text else None
    with torch.inference_mode(False), torch.enable_grad():
        patchers = [mp, te.patcher] if text_groups else [mp]  # a frozen text encoder only encodes, once
        comfy.model_management.load_models_gpu(patchers, memory_required=1e20, force_full_load=True)
        for patcher in patchers:
            release_inference_tensors(patcher.model)
            patcher.model.requires_grad_(False)
        diffusion = mp.model.diffusion_model
        unet_groups = [t for t in spec.targets if t not in TEXT_ENCODER_GROUPS]
        modules = {f"diffusion_model.{n}": m for n, m in select_modules(diffusion, unet_groups).items()}
        if text_groups:
            text_modules = select_modules(te.cond_stage_model, text_groups)
            if not text_modules:
                raise ValueError(f"no layer of this text encoder matches the target groups {text_groups}")
            modules.update({f"text_encoders.{n}": m for n, m in text_modules.items()})
        if not modules:
            raise ValueError(f"no layer of this model matches the target groups {list(spec.targets)}")
        adapters = make_adapters(
            modules,
            spec.method,
            transform_rank=spec.transform_rank,
            residual_rank=spec.residual_rank,
            regularizer=spec.regularizer,
            regularizer_weight=spec.regularizer_weight,
            seed=config.seed,
        )
        trainer = Trainer(adapters, config)
        if options.resume_path is not None:
            _load_resume(options.resume_path, adapters, spec, trainer)
        if trainer.done:
            raise ValueError(f"the resumed adapter is already at step {trainer.step}; set steps above that")
        metadata = {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{architecture_of(model)}/{spec.method}",
            "modelspec.implementation": "comfyui-tlora",
            "modelspec.title": path.stem if path else "tlora",
            "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tlora.method": spec.method,
            "tlora.transform_rank": str(spec.transform_rank),
            "tlora.residual_rank": str(spec.residual_rank),
            "tlora.targets": json.dumps(list(spec.targets)),
            "tlora.base_model": architecture_of(model),
            "tlora.parameters": str(sum(a.num_parameters() for a in adapters.values())),
            "tlora.training": json.dumps({**asdict(config), "training_dtype": options.training_dtype}),
            **options.extra_metadata,
        }
        text = None
        if has_text:
            tokens = [te.tokenize(caption) for caption in captions]
            with torch.no_grad():  # frozen text encoder: encode once; trained: the guider's initial conds
                first = tokens if not text_groups else tokens[:1]
                positive = [e for t in first for e in te.encode_from_tokens_scheduled(t, show_pbar=False)]
            text = (te, tokens) if text_groups else None
        run = _TrainingRun(trainer, options, metadata, adapters, positive, text)
        detach = attach(modules, adapters)
        guider = comfy_extras.nodes_custom_sampler.Guider_Basic(mp)
        guider.set_conds(positive)  # what the guider prepares with; each step's come from the run's conditioner
        try:
            with (
                _Checkpointed(diffusion) if options.gradient_checkpointing else contextlib.nullcontext(),
                _norms_on_copies(te.cond_stage_model) if text is not None else contextlib.nullcontext(),
            ):
                dummy_sigmas = torch.arange(count)  # carries the dataset size, as ComfyUI's trainer does
                guider.sample(torch.zeros_like(samples), samples, _TrainingSampler(run), dummy_sigmas, seed=config.seed)
        except comfy.model_management.InterruptProcessingException:
            saved = run.save(interrupted=True)
            log.warning("training cancelled at step %d%s", trainer.step, f"; saved to {saved}" if saved else "")
            raise
        except NonFiniteLossError as err:
            kept = (
                f"the last good save is {path.name} (step {run.last_save_step})"
                if run.last_save_step
                else "nothing was saved"
            )
            raise ValueError(f"training stopped: {err}; {kept}. Lower the learning rate, or train in fp32.") from None
        finally:
            detach()
        for adapter in adapters.values():
            adapter.requires_grad_(False)
        saved = run.save()
        tensors = module_tensors(adapters)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, tensors, 1.0, 1.0)  # as Apply TLoRA does
    return TrainResult(new_model, new_clip, tensors, list(trainer.losses), saved, trainer.step)


RESUME_NONE = "(none)"


class TrainTLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATrain",
            display_name="Train TLoRA",
            category="training/tlora",
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
                io.Combo.Input("method", options=list(METHODS), default="tlora"),
                io.Int.Input("transform_rank", default=2, min=1, max=16, tooltip="Ring rank of the transform T."),
                io.Int.Input("residual_rank", default=6, min=1, max=256, tooltip="TR ring rank, or LoRA rank."),
                io.Int.Input("steps", default=500, min=1, max=100000),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True),
                io.String.Input("output_name", default="tlora/my_adapter"),
                io.Combo.Input(
                    "targets",
                    options=[
                        "attention",
                        "attention,proj",
                        "attention,feed_forward",
                        "attention,conv",
                        "attention,text_attention",
                    ],
                    tooltip="Layers to adapt; text_attention (the text encoder's) needs clip + captions.",
                    default="attention",
                    optional=True,
                ),
                io.Combo.Input(
                    "regularizer", options=["none", "identity", "orthogonal"], default="none", optional=True
                ),
                io.Float.Input("regularizer_weight", default=0.0, min=0.0, max=10.0, step=1e-4, optional=True),
                io.Float.Input("rotation_learning_rate", default=5e-5, min=1e-7, max=1.0, step=1e-5, optional=True),
                io.Combo.Input("schedule", options=["constant", "cosine"], default="constant", optional=True),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, optional=True),
                io.Int.Input("grad_accumulation", default=1, min=1, max=256, optional=True),
                io.Float.Input("grad_clip", default=1.0, min=0.0, max=100.0, step=0.1, optional=True),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="fp32", optional=True),
                io.Combo.Input("loss", options=["mse", "dco"], default="mse", optional=True),
                io.Float.Input("dco_beta", default=1000.0, min=0.0, max=1e5, optional=True),
                io.Int.Input("save_every", default=0, min=0, max=100000, tooltip="0 = only at the end.", optional=True),
                io.Combo.Input(
                    "resume_from", options=[RESUME_NONE, *adapter_files()], default=RESUME_NONE, optional=True
                ),
                io.Boolean.Input("overwrite", default=False, optional=True),
                io.Int.Input(
                    "preview_every",
                    default=0,
                    min=0,
                    max=100000,
                    optional=True,
                    tooltip="Every N steps, sample one image (first caption, fixed seed) and show it here. 0 = off.",
                ),
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
    def execute(
        cls,
        model,
        latents,
        method,
        transform_rank,
        residual_rank,
        steps,
        learning_rate,
        batch_size,
        seed,
        output_name,
        targets="attention",
        regularizer="none",
        regularizer_weight=0.0,
        rotation_learning_rate=5e-5,
        schedule="constant",
        warmup_steps=0,
        grad_accumulation=1,
        grad_clip=1.0,
        gradient_checkpointing=False,
        training_dtype="fp32",
        loss="mse",
        dco_beta=1000.0,
        save_every=0,
        resume_from=RESUME_NONE,
        overwrite=False,
        preview_every=0,
        positive=None,
        clip=None,
        captions=None,
        preview_vae=None,
    ) -> io.NodeOutput:
        spec = AdapterSpec(
            method, transform_rank, residual_rank, regularizer, regularizer_weight, tuple(targets.split(","))
        )
        config = TrainConfig(
            steps=steps,
            learning_rate=learning_rate,
            rotation_learning_rate=rotation_learning_rate,
            schedule=schedule,
            warmup_steps=warmup_steps,
            batch_size=batch_size,
            grad_accumulation=grad_accumulation,
            grad_clip=grad_clip,
            seed=seed,
            loss=loss,
            dco_beta=dco_beta,
        )
        options = RunOptions(
            training_dtype=training_dtype,
            gradient_checkpointing=gradient_checkpointing,
            save_every=save_every,
            output_path=output_path(output_name),
            overwrite=overwrite,
            resume_path=None if resume_from == RESUME_NONE else resolve_adapter_path(resume_from),
            node_id=cls.hidden.unique_id if cls.hidden else None,
            preview_every=preview_every,
            preview_vae=preview_vae,
        )
        lines = [line.strip() for line in (captions or "").splitlines() if line.strip()]
        result = train(model, latents, positive, spec, config, options, clip=clip, captions=lines)
        path = str(result.path or "")
        return io.NodeOutput(result.model, result.tensors, {"loss": result.losses}, path, result.clip)


NODES = [TrainTLoRA]
