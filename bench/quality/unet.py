"""A small class-conditioned diffusion UNet with ComfyUI's (LDM) layer names, and its
ε-prediction diffusion: cosine noise schedule, training loss, DDIM sampler.

Names follow ComfyUI's ``openaimodel.UNetModel``: ``input_blocks.1.1.transformer_blocks.0
.attn2.to_k``, ``…ff.net.0.proj``, ``…proj_in``, ``…in_layers.2``, so :mod:`tlora.model`'s
target groups select the same kinds of layers as on Stable Diffusion. The condition is a
2-token "prompt" ``[start, class]`` (context ``[B, 2, context_dim]``) that cross-attention
reads; an 11th class token is the empty prompt for classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_STEPS = 1000  # discrete diffusion timesteps


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, int] = (32, 64)  # at 8×8 and at 4×4
    context_dim: int = 32
    head_dim: int = 16
    num_classes: int = 10  # plus one empty-prompt token
    groups: int = 8


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of integer timesteps ``t`` ``[B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimestepEmbedSequential(nn.Sequential):
    """Runs its children, passing the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the time embedding, twice; 1×1 skip when widths differ."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention with ComfyUI's names: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, d = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention (``attn1``), cross-attention on the prompt (``attn2``), feed-forward."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, head_dim)
        self.attn2 = CrossAttention(dim, context_dim, head_dim)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """``[B, C, H, W]`` → tokens ``[B, H·W, C]`` (``proj_in``), one transformer block, back (``proj_out``)."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim, head_dim)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """ε-prediction UNet for ``[B, 1, 8, 8]`` images: two resolutions (8×8, 4×4), five
    transformer blocks (in, in, middle, out, out), skip connections as in LDM."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        ctx, hd, g = config.context_dim, config.head_dim, config.groups
        emb = 4 * c1
        self.time_embed = nn.Sequential(nn.Linear(c1, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.start_token = nn.Parameter(torch.randn(ctx))
        self.class_tokens = nn.Embedding(config.num_classes + 1, ctx)

        def block(*layers):
            return TimestepEmbedSequential(*layers)

        self.input_blocks = nn.ModuleList(
            [
                block(nn.Conv2d(1, c1, 3, padding=1)),
                block(ResBlock(c1, emb, c1, g), SpatialTransformer(c1, ctx, hd, g)),
                block(nn.Conv2d(c1, c1, 3, stride=2, padding=1)),
                block(ResBlock(c1, emb, c2, g), SpatialTransformer(c2, ctx, hd, g)),
            ]
        )
        self.middle_block = block(
            ResBlock(c2, emb, c2, g), SpatialTransformer(c2, ctx, hd, g), ResBlock(c2, emb, c2, g)
        )
        self.output_blocks = nn.ModuleList(
            [
                block(ResBlock(c2 + c2, emb, c2, g), SpatialTransformer(c2, ctx, hd, g)),
                block(ResBlock(c2 + c1, emb, c2, g), nn.Upsample(scale_factor=2, mode="nearest")),
                block(ResBlock(c2 + c1, emb, c1, g), SpatialTransformer(c1, ctx, hd, g)),
                block(ResBlock(c1 + c1, emb, c1, g)),
            ]
        )
        self.out = nn.Sequential(nn.GroupNorm(g, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    @property
    def empty_label(self) -> int:
        return self.config.num_classes

    def context(self, labels: Tensor) -> Tensor:
        """The prompt ``[B, 2, context_dim]``: start token, class token."""
        start = self.start_token.expand(len(labels), 1, -1)
        return torch.cat([start, self.class_tokens(labels)[:, None]], dim=1)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.channels[0]))
        context = self.context(labels)
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


def alphas_cumprod(num_steps: int = NUM_STEPS) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal): ``ᾱ_t = cos²((t/T + s)/(1 + s)·π/2) / ᾱ_0``, s = 0.008, ``[T]``."""
    s = 0.008
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (f[1:] / f[0]).clamp(1e-5, 0.9999).float()


ALPHAS_CUMPROD = alphas_cumprod()


def noised(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``."""
    a = ALPHAS_CUMPROD[t][:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def prediction_errors(model: nn.Module, x0: Tensor, labels: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Per-sample ε-prediction MSE ``[B]``: ``mean‖ε_θ(x_t, t, c) − ε‖²``."""
    return (model(noised(x0, t, noise), t, labels) - noise).pow(2).flatten(1).mean(1)


def random_batch(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator,
    empty_label: int | None = None,
    drop: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x0, labels, t, ε)`` for one training batch drawn from ``generator``: images with
    replacement, uniform timesteps, Gaussian noise; a ``drop`` fraction of labels become
    ``empty_label`` (classifier-free guidance training)."""
    idx = torch.randint(len(images), (batch_size,), generator=generator)
    t = torch.randint(NUM_STEPS, (batch_size,), generator=generator)
    noise = torch.randn(images[idx].shape, generator=generator)
    batch_labels = labels[idx].clone()
    if drop > 0:
        batch_labels[torch.rand(batch_size, generator=generator) < drop] = empty_label
    return images[idx], batch_labels, t, noise


@torch.no_grad()
def sample(model: UNet, labels: Tensor, generator: torch.Generator, steps: int = 20, guidance: float = 2.0) -> Tensor:
    """DDIM (η = 0) samples ``[B, 1, 8, 8]`` for ``labels`` with classifier-free guidance
    ``ε = ε_u + w·(ε_c − ε_u)``, starting from noise drawn from ``generator``."""
    x = torch.randn(len(labels), 1, 8, 8, generator=generator)
    times = torch.linspace(NUM_STEPS - 1, 0, steps).round().long()
    empty = torch.full_like(labels, model.empty_label)
    both = torch.cat([labels, empty])
    for i, t in enumerate(times):
        eps_c, eps_u = model(torch.cat([x, x]), t.repeat(2 * len(labels)), both).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        a = ALPHAS_CUMPROD[t]
        a_next = ALPHAS_CUMPROD[times[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x
