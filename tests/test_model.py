"""Picking layers by name and routing them through adapters."""

import pytest
import torch
from torch import nn

from tlora import PRESETS, TLoRA
from tlora.model import (
    attached,
    bypassed,
    checkpointed_blocks,
    make_adapters,
    norms_on_copies,
    select_modules,
    swapped_forwards,
)


class Attention(nn.Module):
    def __init__(self, dim, context):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context, dim, bias=False)
        self.to_v = nn.Linear(context, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, ctx):
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        return self.to_out(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(8, 16, 1)
        self.attn2 = Attention(16, 12)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8)

    def forward(self, x, ctx):
        h = self.proj_in(x).flatten(2).transpose(1, 2)
        h = self.attn2(h, ctx)
        return self.ff.net(h)


def test_select_groups_and_patterns():
    block = Block()
    assert sorted(select_modules(block)) == ["attn2.to_k", "attn2.to_out.0", "attn2.to_q", "attn2.to_v"]
    assert sorted(select_modules(block, ["feed_forward", "proj"])) == ["ff.net.2", "proj_in"]  # ff.net.0 is no proj
    assert sorted(select_modules(block, [], ["*.to_q", "proj_*"])) == ["attn2.to_q", "proj_in"]
    assert select_modules(block, [], ["depthwise"]) == {}  # grouped conv is not one matrix
    with pytest.raises(ValueError, match=r"no layer group 'mlp' for this model: its groups are \['attention'"):
        select_modules(block, ["mlp"])


def test_attach_and_detach():
    torch.manual_seed(0)
    block = Block().requires_grad_(False)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 12)
    before = block(x, ctx)
    modules = select_modules(block, ["attention", "proj"])
    adapters = {n: TLoRA(m.weight.shape, PRESETS["tlora"]) for n, m in modules.items()}
    with attached(modules, adapters):
        torch.testing.assert_close(block(x, ctx), before, atol=1e-5, rtol=1e-5)  # identity at init
        with torch.no_grad():
            for p in adapters["attn2.to_q"].parameters():
                p.add_(0.1)
        assert not torch.allclose(block(x, ctx), before, atol=1e-3)
        with bypassed(adapters.values()):
            torch.testing.assert_close(block(x, ctx), before)
        block(x, ctx).sum().backward()
        assert all(p.grad is None for p in block.parameters())
        assert adapters["attn2.to_q"].transform[0].grad is not None
    torch.testing.assert_close(block(x, ctx), before)


def test_attach_reports_missing_modules():
    with pytest.raises(KeyError, match="no module"), attached({}, {"x.to_q": TLoRA((4, 4), PRESETS["lora"])}):
        pass


def test_swapped_forwards_restore_even_after_an_error():
    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    before = layer(x)
    with pytest.raises(RuntimeError, match="boom"), swapped_forwards({layer: lambda x: x * 0}):
        assert torch.equal(layer(x), torch.zeros(2, 3))
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__ and torch.equal(layer(x), before)


def test_checkpointed_blocks_give_the_same_gradients():
    torch.manual_seed(0)
    block = Block()
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 12)
    block(x, ctx).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad()
    calls = []
    with checkpointed_blocks(block):
        assert all("forward" in b.__dict__ for b in (block.proj_in, block.attn2))
        block.attn2.to_q.register_forward_hook(lambda *a: calls.append(1))
        block(x, ctx).square().sum().backward()
    assert len(calls) == 2  # attn2 ran again in backward: its activations were recomputed, not stored
    assert plain and {n: p.grad for n, p in block.named_parameters() if p.grad is not None}.keys() == plain.keys()
    for name, p in block.named_parameters():
        if name in plain:
            torch.testing.assert_close(p.grad, plain[name])
    assert "forward" not in block.attn2.__dict__


def test_norms_on_copies_survive_an_in_place_residual():
    norm = nn.LayerNorm(4)
    x = torch.randn(3, 4, requires_grad=True)

    def residual_in_place(h):
        h = h.clone()
        h += norm(h)  # ComfyUI's text encoders: x += attn(norm(x))
        return h.sum()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        residual_in_place(x).backward()
    with norms_on_copies(nn.Sequential(norm)):
        residual_in_place(x).backward()
    assert x.grad is not None and "forward" not in norm.__dict__


@pytest.mark.parametrize("method", ["tlora", "tlora_star", "transform", "residual", "lora", "soda", "svdiff"])
def test_make_adapters_starts_at_the_base_model(method):
    torch.manual_seed(0)
    block = Block().requires_grad_(False)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 12)
    before = block(x, ctx)
    modules = select_modules(block, ["attention", "proj"])
    adapters = make_adapters(modules, method, transform_rank=1, residual_rank=2, seed=3)
    assert sorted(adapters) == sorted(modules)
    assert all(a.method == method for a in adapters.values())
    with attached(modules, adapters):
        torch.testing.assert_close(block(x, ctx), before, atol=1e-5, rtol=1e-5)
    for name, adapter in adapters.items():  # the merged weight is the base weight, bit for bit
        weight = modules[name].weight
        assert torch.equal(adapter.merged_weight(weight), weight.float()), name
        assert torch.equal(adapter.delta_weight(weight), torch.zeros_like(weight)), name


def test_make_adapters_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        make_adapters({}, "dora")
