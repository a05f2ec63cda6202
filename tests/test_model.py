"""Picking layers by name and routing them through adapters."""

import pytest
import torch
from torch import nn

from tlora import PRESETS, TLoRA
from tlora.model import (
    attached,
    bypassed,
    checkpointed_blocks,
    is_plain_weight,
    make_adapters,
    norms_on_copies,
    recomputed_in_backward,
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


# -- bypass training: the adapters around the layer's own forward --------------------------------------------


class Fp8Linear(nn.Module):
    """A layer that stores its weight in float8 with a scale and upcasts it in its forward (as fp8 hosts do);
    not an nn.Linear subclass."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scale = weight.abs().max() / 448
        self.weight = nn.Parameter((weight / self.scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.casts = 0

    def dequantized(self, device=None) -> torch.Tensor:
        return self.weight.to(device, torch.float32) * self.scale

    def forward(self, x):
        self.casts += 1
        return nn.functional.linear(x, self.dequantized().to(x.dtype))


def fp8_weight_of(module, device):
    return module.dequantized(device) if isinstance(module, Fp8Linear) else module.weight.to(device, torch.float32)


@pytest.mark.parametrize("method", ["tlora", "soda", "lora"])
def test_bypass_training_matches_the_merged_layer_and_trains(method):
    """The bypass form around each layer's forward gives the merged output and the same gradients;
    on an fp8 layer (not an nn.Linear) it trains through the layer's own upcast."""
    torch.manual_seed(0)
    block = Block().requires_grad_(False)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 12)
    modules = select_modules(block, ["attention", "proj"])  # Linear and a 1×1 conv
    adapters = make_adapters(modules, method, transform_rank=1, residual_rank=2, seed=3)
    with torch.no_grad():
        for a in adapters.values():
            for p in a.parameters():
                p.add_(0.05 * torch.randn_like(p))
    results = []
    for bypass in (False, True):
        for a in adapters.values():
            a.zero_grad()
        with attached(modules, adapters, bypass=bypass):
            y = block(x, ctx)
            y.square().sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, a in adapters.items() for p in a.parameters()}))
    (merged, merged_grads), (bypassed_out, bypass_grads) = results
    torch.testing.assert_close(bypassed_out, merged, atol=1e-5, rtol=1e-5)
    for name in merged_grads:
        torch.testing.assert_close(bypass_grads[name], merged_grads[name], atol=1e-4, rtol=1e-4)

    block.attn2.to_q = Fp8Linear(block.attn2.to_q.weight)
    modules = select_modules(block, ["attention"])
    assert isinstance(modules["attn2.to_q"], Fp8Linear)  # in_features, out_features, a 2-D weight
    adapters = make_adapters(modules, method, seed=3, residual_rank=2, weight_of=lambda m: fp8_weight_of(m, "cpu"))
    before = {n: p.detach().clone() for n, p in adapters["attn2.to_q"].named_parameters()}
    optimizer = torch.optim.SGD([p for a in adapters.values() for p in a.parameters()], lr=1.0)
    with attached(modules, adapters, bypass=True, weight_of=fp8_weight_of):
        block(x, ctx).square().sum().backward()
        optimizer.step()
    assert block.attn2.to_q.weight.dtype == torch.float8_e4m3fn and block.attn2.to_q.casts == 1
    moved = [n for n, p in adapters["attn2.to_q"].named_parameters() if not torch.equal(p, before[n])]
    assert moved, "no parameter of the fp8 layer's adapter moved"


def test_is_plain_weight():
    assert is_plain_weight(nn.Linear(2, 2).weight) and is_plain_weight(torch.zeros(2, dtype=torch.bfloat16))
    assert not is_plain_weight(torch.zeros(2, dtype=torch.float8_e4m3fn))
    assert not is_plain_weight(Fp8Linear(torch.randn(4, 4)).weight)


def test_recomputed_in_backward_keeps_no_cast_and_gives_the_same_gradients():
    torch.manual_seed(0)
    layer, head = Fp8Linear(torch.randn(16, 16)), nn.Linear(16, 1)
    x = torch.randn(4, 16, requires_grad=True)

    def saved_shapes():
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = head(layer(x).relu())
        return y, shapes

    y, shapes = saved_shapes()
    y.sum().backward()
    plain = x.grad.clone()
    assert (16, 16) in shapes  # autograd keeps the upcast weight for backward
    x.grad = None
    layer.casts = 0
    with recomputed_in_backward([layer]):
        y, shapes = saved_shapes()
        assert (16, 16) not in shapes
        y.sum().backward()
    assert layer.casts == 2 and "forward" not in layer.__dict__  # ran again in backward; restored
    torch.testing.assert_close(x.grad, plain)


def test_recomputed_layers_reach_the_adapters_and_keep_autocast():
    """An adapter attached around a recomputed layer gets the same gradients; the layer runs again under
    the forward's autocast."""
    torch.manual_seed(0)
    block = Block().requires_grad_(False)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 12)
    modules = select_modules(block, ["attention"])
    adapters = make_adapters(modules, "tlora", transform_rank=1, residual_rank=2, seed=1)
    grads = []
    dtypes = []
    to_k = block.attn2.to_k
    to_k.forward = lambda x: dtypes.append(nn.Linear.forward(to_k, x).dtype) or nn.Linear.forward(to_k, x)
    for recompute in (False, True):
        for a in adapters.values():
            a.zero_grad()
        with (
            recomputed_in_backward(modules.values()) if recompute else swapped_forwards({}),
            attached(modules, adapters, bypass=True),
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            block(x, ctx).float().square().sum().backward()
        grads.append([p.grad.clone() for a in adapters.values() for p in a.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert dtypes == [torch.bfloat16] * 3  # forward, forward, and the recompute in backward


def test_nested_swaps_restore_the_outer_forward():
    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    outer = swapped_forwards({layer: lambda x: x * 2})
    with outer:
        with swapped_forwards({layer: lambda x: x * 3}):
            assert torch.equal(layer(x), x * 3)
        assert torch.equal(layer(x), x * 2)
    assert "forward" not in layer.__dict__
