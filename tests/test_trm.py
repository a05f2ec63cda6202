"""The tensor-ring matrix: init, materialize, fast paths, regularizers, trainable ranks."""

import itertools
import math

import pytest
import torch

from tlora import trm
from tlora.factorize import factorize


def random_cores(factors, rank, cols=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cols = cols or factors
    return [
        torch.randn(i, j, rank, rank, generator=gen, dtype=dtype) / rank for i, j in zip(factors, cols, strict=True)
    ]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("num_factors", [2, 3, 4])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 6])
def test_identity_init_is_exactly_identity(num_factors, rank):
    factors = factorize(240, num_factors)
    cores = trm.identity_cores(factors, rank)
    assert torch.equal(trm.materialize(cores), torch.eye(240))
    x, w = torch.randn(7, 240), torch.randn(32, 240)
    assert torch.equal(trm.apply(x, cores), x)
    assert torch.equal(trm.apply_to_weight(w, cores), w)
    half = [c.to(torch.bfloat16) for c in cores]  # exact in any precision, not only fp32
    assert torch.equal(trm.materialize(half), torch.eye(240, dtype=torch.bfloat16))


def test_reference_init_is_identity_too():
    cores = trm.reference_identity_cores((4, 8, 10), 3)
    torch.testing.assert_close(trm.materialize(cores), torch.eye(320), atol=1e-6, rtol=0)


def test_trace_formula_matches_explicit_loop():
    factors, cols, rank = (2, 3, 2), (3, 2, 2), 3
    cores = random_cores(factors, rank, cols, dtype=torch.float64)
    dense = trm.materialize(cores)
    assert dense.shape == (12, 12)
    for row in itertools.product(*map(range, factors)):
        for col in itertools.product(*map(range, cols)):
            prod = torch.eye(rank, dtype=torch.float64)
            for d in range(3):
                prod = prod @ cores[d][row[d], col[d]]
            r = (row[0] * 3 + row[1]) * 2 + row[2]
            c = (col[0] * 2 + col[1]) * 2 + col[2]
            assert math.isclose(dense[r, c].item(), torch.trace(prod).item(), rel_tol=1e-12, abs_tol=1e-12)


def test_rank_one_is_kronecker_product():
    cores = random_cores((2, 3, 4), 1)
    kron = torch.kron(torch.kron(cores[0][..., 0, 0], cores[1][..., 0, 0]), cores[2][..., 0, 0])
    torch.testing.assert_close(trm.materialize(cores), kron)


@pytest.mark.parametrize("factors", [(4, 8, 10), (3, 5), (2, 3, 2, 5), (1, 1, 7)])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 6])
def test_fast_paths_equal_materialized(factors, rank):
    cores = random_cores(factors, rank)
    dense = trm.materialize(cores)
    n = dense.shape[0]
    x = torch.randn(2, 5, n)
    assert rel_err(trm.apply(x, cores), x @ dense.T) < 1e-5
    w = torch.randn(9, n)
    assert rel_err(trm.apply_to_weight(w, cores), w @ dense) < 1e-5
    conv = torch.randn(6, n, 1, 1)
    assert rel_err(trm.apply_to_weight(conv, cores).flatten(1), conv.flatten(1) @ dense) < 1e-5


def test_rectangular_cores():
    cores = random_cores((2, 3, 4), 2, cols=(5, 1, 2))
    dense = trm.materialize(cores)
    assert dense.shape == (24, 10)
    x = torch.randn(4, 10)
    assert rel_err(trm.apply(x, cores), x @ dense.T) < 1e-5


def test_product_rule():
    a, b = random_cores((2, 3, 4), 2, seed=1), random_cores((2, 3, 4), 3, seed=2)
    c = trm.product_cores(a, b)
    assert c[0].shape == (2, 2, 6, 6)
    assert rel_err(trm.materialize(c), trm.materialize(a) @ trm.materialize(b).T) < 1e-5


@pytest.mark.parametrize("regularizer", [trm.identity_regularizer, trm.orthogonal_regularizer])
def test_regularizers_zero_at_init_and_grow_away(regularizer):
    anchor = trm.identity_cores((4, 8, 10), 2)
    cores = [c.clone().requires_grad_() for c in anchor]
    at_init = regularizer(cores, anchor)
    assert at_init.item() == 0.0
    at_init.backward()
    assert all(torch.isfinite(c.grad).all() for c in cores)
    values = []
    for eps in (1e-3, 1e-2, 1e-1):
        gen = torch.Generator().manual_seed(0)
        moved = [c.detach() + eps * torch.randn(c.shape, generator=gen) for c in anchor]
        values.append(regularizer(moved, anchor).item())
    assert 0 < values[0] < values[1] < values[2]


def test_orthogonal_regularizer_ignores_orthogonal_kronecker_moves():
    """R = 1 cores that stay orthogonal keep TTᵀ = I: the orthogonal penalty stays 0."""
    anchor = trm.identity_cores((2, 3), 1)
    q, _ = torch.linalg.qr(torch.randn(2, 2))
    rotated = [anchor[0] * 0 + q[:, :, None, None] * anchor[0][0, 0], anchor[1]]
    assert trm.orthogonal_regularizer(rotated, anchor).item() < 1e-5
    assert trm.identity_regularizer(rotated, anchor).item() > 0.1


def fit_random_target(cores, steps=60):
    """A few Adam steps of ‖x Tᵀ − x T*ᵀ‖² towards a random dense T*."""
    gen = torch.Generator().manual_seed(3)
    n = trm.shape_of(cores)[0]
    target = torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / math.sqrt(n)
    x = torch.randn(64, n, generator=gen)
    params = [torch.nn.Parameter(c.clone()) for c in cores]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (trm.apply(x, params) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return params, losses


def slice_spread(cores):
    """How far the R×R bond slices of each core are from all being equal."""
    return max((c - c.mean(dim=(2, 3), keepdim=True)).abs().max().item() for c in cores)


def test_gradients_reach_every_core_slice():
    """At init every bond slice on or below the diagonal gets a gradient (those above it meet
    an exact 0 in every ring path: that is what makes T exactly I); after one step all do."""
    cores = [c.clone().requires_grad_() for c in trm.identity_cores((4, 8, 10), 2)]
    x, probe = torch.randn(16, 320), torch.randn(16, 320)
    (trm.apply(x, cores) * probe).sum().backward()
    lower = torch.ones(2, 2).tril().bool()
    for c in cores:
        per_slice = c.grad.flatten(0, 1).norm(dim=0)  # [R, R]
        assert (per_slice[lower] > 0).all()
    with torch.no_grad():
        for c in cores:
            c -= 0.1 * c.grad
            c.grad = None
    (trm.apply(x, cores) * probe).sum().backward()
    for c in cores:
        assert (c.grad.flatten(0, 1).norm(dim=0) > 0).all()


def test_every_rank_slice_trains_with_our_init():
    init = trm.identity_cores((3, 4, 5), 2)
    trained, losses = fit_random_target(init)
    _, reference_losses = fit_random_target(trm.reference_identity_cores((3, 4, 5), 2))
    assert losses[-1] < 0.95 * reference_losses[-1]  # the extra rank buys a better fit
    for before, after in zip(init, trained, strict=True):
        change = (after.detach() - before).flatten(0, 1).norm(dim=0)  # each of the R×R slices
        assert (change > 1e-3).all()
    # the slices became genuinely different: not a rank-1 transform in disguise
    assert slice_spread([p.detach() for p in trained]) > 1e-2


def test_reference_init_leaves_ranks_dead():
    """The flaw METHOD.md describes: all R×R slices stay identical, and the rank-2 ring
    trains exactly like the rank-1 Kronecker transform."""
    trained, losses = fit_random_target(trm.reference_identity_cores((3, 4, 5), 2))
    assert slice_spread([p.detach() for p in trained]) < 1e-6
    _, kronecker_losses = fit_random_target(trm.reference_identity_cores((3, 4, 5), 1))
    assert math.isclose(losses[-1], kronecker_losses[-1], rel_tol=1e-4)
