"""Batched factor building (tlora.batched): same outputs and gradients as each layer's own
path, one build per group of same-shaped layers, and exact identity at init under autocast."""

import pytest
import torch

from tlora import cost
from tlora.adapters.base import base_forward
from tlora.adapters.tlora import TLoRA, preset
from tlora.batched import group_key, prepared

SHAPES = [(24, 32), (24, 32), (40, 32), (24, 32)]


def trained(shape, method, seed):
    """An adapter whose parameters moved away from their init, as after training."""
    adapter = TLoRA(shape, preset(method, transform_rank=2, residual_rank=3), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return adapter


def outputs_and_grads(adapters, weights, x, batched):
    for a in adapters:
        a.zero_grad()
    with prepared(adapters) if batched else torch.enable_grad():
        ys = [a(x, w) for a, w in zip(adapters, weights, strict=True)]
    sum((y**2).sum() for y in ys).backward()
    return ys, [[p.grad.clone() for p in a.parameters()] for a in adapters]


@pytest.mark.parametrize("method", ["tlora", "tlora_star", "transform", "residual", "lora"])
def test_same_outputs_and_gradients_as_each_layers_own_path(method):
    adapters = [trained(s, method, seed=i) for i, s in enumerate(SHAPES)]
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(s, generator=gen) / 6 for s in SHAPES]
    x = torch.randn(5, 7, 32, generator=gen)
    ys, grads = outputs_and_grads(adapters, weights, x, batched=False)
    ys_b, grads_b = outputs_and_grads(adapters, weights, x, batched=True)
    for y, y_b in zip(ys, ys_b, strict=True):
        torch.testing.assert_close(y_b, y, atol=1e-5, rtol=1e-5)
    for g, g_b in zip(grads, grads_b, strict=True):
        for a, b in zip(g, g_b, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_groups_by_shape_and_leaves_others_alone():
    narrow = [trained(s, "tlora", seed=i) for i, s in enumerate(SHAPES)]
    conv = TLoRA((24, 8, 2, 2), preset("tlora"))
    wide_in = int(cost.MAX_DENSE_ELEMENTS**0.5) + 1
    wide = TLoRA((4, wide_in), preset("transform", transform_rank=1))
    assert len({group_key(a) for a in narrow}) == 2  # 24×32 (three layers) and 40×32
    with prepared([*narrow, conv, wide]):
        assert all(a.prepared is not None for a in narrow)
        assert conv.prepared is None and wide.prepared is None
        excess = [a.prepared[0] for a in narrow]
        assert excess[0]._base is excess[1]._base  # one build for the group, viewed per layer
    assert all(a.prepared is None for a in narrow)


def test_identity_at_init_survives_autocast():
    """At init T = I and Δ = 0; the batched path keeps E = T − I, so a bf16 forward equals the
    frozen layer's bf16 forward exactly."""
    adapters = [TLoRA(s, preset("tlora"), seed=i) for i, s in enumerate(SHAPES)]
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(s, generator=gen) / 6 for s in SHAPES]
    x = torch.randn(4, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16), prepared(adapters, torch.bfloat16):
        assert adapters[0].prepared[0].dtype == torch.bfloat16
        for a, w in zip(adapters, weights, strict=True):
            base = base_forward(x, w, None, None)
            assert torch.equal(a(x, w), base)
