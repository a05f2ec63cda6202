"""The training loop inside ComfyUI's sampling machinery.

The model is driven through a Guider and a Sampler (as ComfyUI's Train LoRA node does), so every
model family ComfyUI loads trains through the same code. The loss is the model's own prediction
target (ε, v or flow): ComfyUI hands back the denoised estimate ``x̂0 = a(σ, x) + c_out(σ)·F(x)``,
and ``(x̂0 − x0) / c_out`` is exactly the error of the raw prediction F against its target. The
optimization itself is :class:`tlora.train.Trainer`; the run's files are :class:`tlora.run.RunFiles`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_extras.nodes_train import make_batch_extra_option_dict

from ..tlora.batched import prepared
from ..tlora.dataset import draw_batch
from ..tlora.distributed import World
from ..tlora.model import bypassed
from ..tlora.run import RunFiles
from ..tlora.train import dco_loss, step_generator
from .compat import previewer

PREVIEW_STEPS = 12  # Euler steps of a training preview


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
class Conditioner:
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


class TrainingSampler(comfy.samplers.Sampler):
    """Receives ComfyUI's prepared model wrapper, then runs the training."""

    def __init__(self, run: TrainingLoop):
        self.run = run

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        self.run.loop(model_wrap, extra_args, latent_image)
        return torch.zeros_like(latent_image)


@dataclass
class TrainingLoop:
    files: RunFiles
    positive: list | None
    text: tuple[object, list] | None
    node_id: str | None = None
    preview_vae: object | None = None
    _previewer: object | None = None  # ComfyUI's latent previewer, made at the first preview
    buckets: list[torch.Tensor] | None = None  # latents of several shapes (else the sampler's latent is all)

    @property
    def trainer(self):
        return self.files.trainer

    def dataset(self, model_wrap, latent_image: torch.Tensor) -> list[torch.Tensor]:
        """The training latents as the sampler prepared its ``latent_image`` (on the device, through
        ``process_latent_in``): that one, or each bucket likewise."""
        if self.buckets is None:
            return [latent_image]
        process = model_wrap.inner_model.process_latent_in
        return [process(b.detach().to(latent_image.device, latent_image.dtype)) for b in self.buckets]

    def micro_loss(self, model_wrap, extra_args, buckets: list[torch.Tensor], conditioner: Conditioner):
        cfg = self.trainer.config
        sampling = model_wrap.inner_model.model_sampling
        sizes = [len(b) for b in buckets]
        count, device, dtype = sum(sizes), buckets[0].device, cfg.torch_dtype
        batched, compile = cfg.batched_on(device), cfg.compile_adapters
        world = World.current()  # data parallel: all ranks draw the whole micro-batch, each trains its shard

        def loss(step: int, micro: int) -> torch.Tensor:
            gen = step_generator(cfg.seed, step, micro)
            bucket, drawn = draw_batch(sizes, cfg.batch_size * world.size, gen)
            mine, weight = world.shard(len(drawn)), world.shard_weight(len(drawn))
            x0 = buckets[bucket][drawn[mine]].float()
            idx = [sum(sizes[:bucket]) + row for row in drawn[mine]]  # the images' places in the dataset (captions)
            percents = torch.rand(len(drawn), generator=gen)[mine]
            sigma = torch.tensor([float(sampling.percent_to_sigma(p.item())) for p in percents], device=device)
            noise = torch.randn((len(drawn), *x0.shape[1:]), generator=gen)[mine].to(device)
            xt = sampling.noise_scaling(sigma, noise, x0, False)
            c_out = sampling.calculate_denoised(sigma, torch.ones_like(xt), torch.zeros_like(xt))
            extra = make_batch_extra_option_dict(extra_args, idx, full_size=count)

            def prediction_error(adapters) -> torch.Tensor:
                autocast = dtype != torch.float32
                with (
                    torch.autocast(device.type, dtype=dtype, enabled=autocast),
                    prepared(adapters, dtype if autocast else None, compile) if batched else contextlib.nullcontext(),
                ):
                    model_wrap.conds["positive"] = conditioner(idx, x0)
                    denoised = model_wrap(xt, sigma, **extra)
                return ((denoised.float() - x0) / c_out).pow(2).mean(dim=tuple(range(1, x0.ndim)))

            error = prediction_error(self.trainer.adapters.values())
            if cfg.loss == "mse":
                return error.mean() * weight
            with torch.no_grad(), bypassed(self.trainer.adapters.values()):
                reference = prediction_error(())  # the base model: text encoder and UNet unadapted
            return dco_loss(error, reference, cfg.dco_beta) * weight

        return loss

    @torch.no_grad()
    def preview(self, model_wrap, extra_args, latents, conditioner: Conditioner):
        """A cheap sample with the current adapters: the first image's caption, a fixed seed,
        Euler over PREVIEW_STEPS sigmas; decoded by the VAE if one is given, else by ComfyUI's
        previewer (TAESD or latent→RGB). Returns a PIL image."""
        sampling = model_wrap.inner_model.model_sampling
        device, dtype = latents.device, self.trainer.config.torch_dtype
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
        if self.preview_vae is None:
            if self._previewer is None:
                self._previewer = previewer(device, model_wrap.inner_model.latent_format)
            return self._previewer.decode_latent_to_preview(x)
        pixels = self.preview_vae.decode(model_wrap.inner_model.process_latent_out(x))[0].clamp(0, 1)
        return latent_preview.preview_to_image(pixels.reshape(-1, *pixels.shape[-3:])[0] * 2 - 1)

    def loop(self, model_wrap, extra_args, latents) -> None:
        trainer = self.trainer
        cfg = trainer.config
        conditioner = Conditioner(model_wrap.inner_model, self.positive, self.text, cfg.seed)
        buckets = self.dataset(model_wrap, latents)
        micro_loss = self.micro_loss(model_wrap, extra_args, buckets, conditioner)
        bar = comfy.utils.ProgressBar(cfg.steps)
        bar.update_absolute(trainer.step, cfg.steps)
        start, first = time.perf_counter(), trainer.step
        while not trainer.done:
            comfy.model_management.throw_exception_if_processing_interrupted()
            loss = trainer.train_step(micro_loss)
            self.files.log_step(loss)
            eta = (time.perf_counter() - start) / (trainer.step - first) * (cfg.steps - trainer.step)
            preview = None
            due = cfg.preview_every and (trainer.step % cfg.preview_every == 0 or trainer.done)
            if due and World.current().is_main:
                preview = ("JPEG", self.preview(model_wrap, extra_args, buckets[0], conditioner), 512)
            bar.update_absolute(trainer.step, cfg.steps, preview)
            send_progress(self.node_id, trainer.step, cfg.steps, loss, eta, preview is not None)
            if self.files.save_due():
                self.files.save()


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
