"""StiefelAdam, the polar retraction, the Cayley map and the SODA optimizer set."""

import copy

import pytest
import torch

from tlora import SODA, StiefelAdam, soda_optimizers, soda_preset
from tlora.stiefel import cayley, polar


def orthogonality_error(q):
    q = q.detach().double()
    return (q.mT @ q - torch.eye(q.shape[-1], dtype=q.dtype)).norm(dim=(-2, -1)).max().item()


def random_rotation(k, scale, seed):
    """A rotation in SO(k): exp of a random skew matrix."""
    a = torch.randn(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return torch.linalg.matrix_exp(a - a.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polar_equals_svd_polar_factor(dtype):
    gen = torch.Generator().manual_seed(0)
    near = torch.eye(16) + 0.05 * torch.randn(5, 16, 16, generator=gen)
    general = torch.randn(3, 16, 16, generator=gen)
    for x in (near.to(dtype), general.to(dtype)):
        u, _, vh = torch.linalg.svd(x.double())
        q = polar(x)
        assert q.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert (q.double() - u @ vh).abs().max().item() < tol
        assert orthogonality_error(q) < tol


def test_cayley_is_a_rotation():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 10, 10, generator=gen, dtype=torch.float64)
    q = cayley(a)
    assert orthogonality_error(q) < 1e-12
    torch.testing.assert_close(torch.linalg.det(q), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(cayley(torch.zeros(7, 7)), torch.eye(7))
    # only the strict upper triangle is used
    torch.testing.assert_close(cayley(a.triu(1)), q)


def test_rejects_non_square():
    with pytest.raises(ValueError):
        StiefelAdam([torch.nn.Parameter(torch.zeros(3, 4))])


def test_stays_orthogonal_and_descends_for_1000_steps():
    """A random least-squares objective over factors of SODA's sizes, repeated sizes batched."""
    gen = torch.Generator().manual_seed(0)
    sizes = [4, 6, 8, 8, 10, 16, 20, 64, 64]
    factors = [torch.nn.Parameter(torch.eye(k)) for k in sizes]
    inputs = [torch.randn(32, k, generator=gen) for k in sizes]
    targets = [torch.randn(32, k, generator=gen) for k in sizes]

    def objective():
        return sum(((x @ q - t) ** 2).sum() for x, q, t in zip(inputs, factors, targets, strict=True))

    opt = StiefelAdam(factors, lr=1e-2)
    start = objective().item()
    for _ in range(1000):
        opt.zero_grad()
        objective().backward()
        opt.step()
    assert objective().item() < 0.5 * start
    for q in factors:
        assert q.dtype == torch.float32
        assert orthogonality_error(q) < 1e-5
        assert (q.mT @ q - torch.eye(q.shape[0])).norm().item() < 1e-5  # measured in fp32 too


def test_batched_update_equals_one_at_a_time():
    gen = torch.Generator().manual_seed(1)
    targets = [random_rotation(8, 0.3, seed).float() for seed in range(3)]
    batched = [torch.nn.Parameter(torch.eye(8)) for _ in targets]
    alone = [torch.nn.Parameter(torch.eye(8)) for _ in targets]
    opt_batched = StiefelAdam(batched, lr=3e-2)
    opts_alone = [StiefelAdam([q], lr=3e-2) for q in alone]
    weights = torch.randn(8, 8, generator=gen)
    for _ in range(20):
        for group, opts in ((batched, [opt_batched]), (alone, opts_alone)):
            loss = sum(((q - t) * weights).square().sum() for q, t in zip(group, targets, strict=True))
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
    for a, b in zip(batched, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_state_dict_resumes_exactly():
    target = random_rotation(6, 0.4, 0).float()

    def train(q, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            (q - target).square().sum().backward()
            opt.step()

    q1 = torch.nn.Parameter(torch.eye(6))
    opt1 = StiefelAdam([q1], lr=1e-2)
    train(q1, opt1, 10)
    q2 = torch.nn.Parameter(q1.detach().clone())
    opt2 = StiefelAdam([q2], lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))  # as after torch.save/load
    train(q1, opt1, 5)
    train(q2, opt2, 5)
    torch.testing.assert_close(q1, q2, atol=0, rtol=0)


@pytest.mark.parametrize("rotation", ["stiefel", "cayley"])
def test_reaches_a_known_rotation(rotation):
    """Both parameterizations recover a target in SO(k) from Q = I through a regression."""
    k = 10
    target = random_rotation(k, 0.25, seed=3).float()
    x = torch.randn(256, k, generator=torch.Generator().manual_seed(4))
    y = x @ target.T
    if rotation == "stiefel":
        param = torch.nn.Parameter(torch.eye(k))
        opt = StiefelAdam([param], lr=2e-2)
        rotation_of = lambda: param  # noqa: E731
    else:
        param = torch.nn.Parameter(torch.zeros(k, k))
        opt = torch.optim.Adam([param], lr=2e-2)
        rotation_of = lambda: cayley(param)  # noqa: E731
    assert (rotation_of() - target).norm().item() > 1.0
    for step in range(1500):
        opt.zero_grad()
        ((x @ rotation_of().T - y) ** 2).mean().backward()
        opt.step()
        if step > 100 and step % 100 == 0:
            for group in opt.param_groups:
                group["lr"] *= 0.7
    q = rotation_of().detach()
    assert (q - target).norm().item() < 1e-3
    assert orthogonality_error(q) < 1e-5


def test_soda_optimizers_route_parameters():
    soda = SODA((64, 48))
    cayley_soda = SODA((64, 48), soda_preset("soda", rotation="cayley"))
    svdiff = SODA((64, 48), soda_preset("svdiff"))
    model = torch.nn.ModuleDict({"a": soda, "b": cayley_soda, "c": svdiff})
    opts = soda_optimizers([model, soda], lr_delta=1e-3, lr_rotation=1e-4, weight_decay=1e-4)
    kinds = {type(o).__name__: o for o in opts}
    assert set(kinds) == {"AdamW", "StiefelAdam", "Adam"}
    adamw, stiefel, adam = kinds["AdamW"], kinds["StiefelAdam"], kinds["Adam"]
    assert [id(p) for p in adamw.param_groups[0]["params"]] == [id(a.delta) for a in (soda, cayley_soda, svdiff)]
    assert adamw.param_groups[0]["lr"] == 1e-3 and adamw.param_groups[0]["weight_decay"] == 1e-4
    assert [id(p) for p in stiefel.param_groups[0]["params"]] == [id(q) for q in soda.rotation]
    assert [id(p) for p in adam.param_groups[0]["params"]] == [id(a) for a in cayley_soda.cayley]
    assert stiefel.param_groups[0]["lr"] == adam.param_groups[0]["lr"] == 1e-4
    assert [type(o).__name__ for o in soda_optimizers(svdiff, 1e-3, 1e-4)] == ["AdamW"]
    with pytest.raises(ValueError):
        soda_optimizers(torch.nn.Linear(2, 2), 1e-3, 1e-4)
