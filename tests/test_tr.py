"""The tensor-ring residual: zero init, trace formula, activations path."""

import itertools

import pytest
import torch

from tlora import tr


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_cores(out_factors, in_factors, rank, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(o, rank, rank, generator=gen, dtype=dtype) for o in out_factors]
    ins = [torch.randn(i, rank, rank, generator=gen, dtype=dtype) for i in in_factors]
    return outs, ins


@pytest.mark.parametrize("num_factors", [2, 3, 4])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_zero_init(num_factors, rank):
    out_f, in_f = (2,) * num_factors, (3,) * num_factors
    outs, ins = tr.init_cores(out_f, in_f, rank)
    assert tr.materialize(outs, ins).abs().max().item() == 0.0
    assert outs[0].abs().max().item() == 0.0
    assert all(c.abs().max() > 0 for c in outs[1:] + ins)


def test_trace_formula_matches_explicit_loop():
    out_f, in_f, rank = (2, 3), (3, 2), 3
    outs, ins = random_cores(out_f, in_f, rank, dtype=torch.float64)
    delta = tr.materialize(outs, ins)
    assert delta.shape == (6, 6)
    for o in itertools.product(*map(range, out_f)):
        for i in itertools.product(*map(range, in_f)):
            prod = outs[0][o[0]] @ outs[1][o[1]] @ ins[0][i[0]] @ ins[1][i[1]]
            assert torch.isclose(delta[o[0] * 3 + o[1], i[0] * 2 + i[1]], torch.trace(prod))


@pytest.mark.parametrize("rank", [1, 2, 6])
def test_apply_equals_materialized(rank):
    outs, ins = random_cores((4, 8, 10), (8, 8, 12), rank)
    delta = tr.materialize(outs, ins)
    x = torch.randn(3, 7, 768)
    assert rel_err(tr.apply(x, outs, ins), x @ delta.T) < 1e-5
    up, down = tr.low_rank_factors(outs, ins)
    assert up.shape == (320, rank * rank) and down.shape == (rank * rank, 768)


def test_gradient_reaches_first_core_at_init_then_all():
    outs, ins = tr.init_cores((2, 3), (3, 2), 2)
    params = [torch.nn.Parameter(c) for c in outs + ins]
    x, target = torch.randn(8, 6), torch.randn(8, 6)
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(2):
        opt.zero_grad()
        (tr.apply(x, params[:2], params[2:]) - target).pow(2).sum().backward()
        if step == 0:
            assert params[0].grad.abs().sum() > 0  # B¹ learns first, as LoRA's up-projection
        else:
            assert all(p.grad.abs().sum() > 0 for p in params)
        opt.step()
