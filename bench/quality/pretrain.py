"""The base model: the UNet trained from scratch on the old classes ("pretraining"), with an
exponential moving average of its weights, cached by its settings."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tlora.train import step_generator

from .unet import UNet, UNetConfig, prediction_errors, random_batch


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 700
    batch_size: int = 128
    learning_rate: float = 2e-3
    label_drop: float = 0.1  # empty-prompt fraction, for classifier-free guidance
    ema: float = 0.995
    seed: int = 0


def pretrain(images: Tensor, labels: Tensor, unet: UNetConfig, config: PretrainConfig, log=print) -> UNet:
    """Adam with a cosine learning rate on the ε-prediction loss; returns the EMA model, frozen."""
    torch.manual_seed(config.seed)
    model = UNet(unet)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        gen = step_generator(config.seed, step)
        x0, y, t, noise = random_batch(images, labels, config.batch_size, gen, model.empty_label, config.label_drop)
        loss = prediction_errors(model, x0, y, t, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - config.ema)
        if (step + 1) % max(1, config.steps // 5) == 0:
            log(f"  pretrain step {step + 1}/{config.steps}: loss {loss.item():.4f}")
    return ema.eval()


def cache_key(unet: UNetConfig, config: PretrainConfig, data: Tensor) -> str:
    """A short hash of the settings and the training images: a cached base is reused only for the same ones."""
    text = json.dumps([asdict(unet), asdict(config)], sort_keys=True).encode()
    return hashlib.blake2b(text + data.numpy().tobytes(), digest_size=8).hexdigest()


def load_or_pretrain(
    images: Tensor, labels: Tensor, unet: UNetConfig, config: PretrainConfig, cache_dir: Path | None, log=print
) -> UNet:
    """The pretrained base from ``cache_dir`` when one with the same key is there, else trained (and cached)."""
    path = None if cache_dir is None else cache_dir / f"base-{cache_key(unet, config, images)}.safetensors"
    if path is not None and path.is_file():
        log(f"pretrained base: cached {path}")
        model = UNet(unet)
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    model = pretrain(images, labels, unet, config, log)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model
