"""``prepared(..., compile=True)`` (tlora.batched): the factor build through ``torch.compile``
gives eager's outputs and gradients, and falls back to eager, with one warning, when compiling
fails. Inductor on CPU compiles with a C++ compiler, seconds per graph: this file compiles two
(one TLoRA(2,6) group, one SODA group), shared through a module-scoped fixture."""

import logging
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from tlora import SODA, TLoRA, batched, preset, soda_preset
from tlora.batched import prepared
from tlora.stiefel import polar

SHAPE = (24, 24)  # square: the residual's out- and in-cores chain together
METHODS = {
    "TLoRA(2,6)": lambda seed: TLoRA(SHAPE, preset("tlora", transform_rank=2, residual_rank=6), seed=seed),
    "SODA": lambda seed: SODA(SHAPE, soda_preset("soda")),
}


def group(method: str):
    """Three same-shaped layers (one group) with parameters moved off their init, their
    weights and an input."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(SHAPE, generator=gen) / 5 for _ in range(3)]
    adapters = []
    for seed, weight in enumerate(weights):
        adapter = METHODS[method](seed)
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
                if name.startswith("rotation."):
                    p.copy_(polar(p))
        if isinstance(adapter, SODA):
            adapter.bind(weight)
        adapters.append(adapter)
    return adapters, weights, torch.randn(5, SHAPE[1], generator=gen)


def outputs_and_grads(adapters, weights, x, compile):
    for a in adapters:
        a.zero_grad()
    with prepared(adapters, compile=compile):
        ys = [a(x, w) for a, w in zip(adapters, weights, strict=True)]
    sum((y**2).sum() for y in ys).backward()
    return ys, [p.grad.clone() for a in adapters for p in a.parameters()]


def compiler_missing() -> str | None:
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler for inductor on CPU"
    return None


@pytest.fixture(scope="module")
def runs():
    """``method → (eager, compiled, graphs)``: outputs and gradients of one group each way,
    and the graphs dynamo compiled for it."""
    if reason := compiler_missing():
        pytest.skip(reason)
    results = {}
    for method in METHODS:
        adapters, weights, x = group(method)
        eager = outputs_and_grads(adapters, weights, x, compile=False)
        before = counters["stats"]["unique_graphs"]
        compiled = outputs_and_grads(adapters, weights, x, compile=True)
        assert not batched._compile_failed, "compiling failed: see the logged warning"
        results[method] = eager, compiled, counters["stats"]["unique_graphs"] - before
    return results


@pytest.mark.parametrize("method", METHODS)
def test_compiled_build_gives_eagers_outputs_and_gradients(runs, method):
    (ys, grads), (ys_c, grads_c), graphs = runs[method]
    assert graphs == 1  # the whole build in one graph: no graph break, no fallback to eager
    for y, y_c in zip(ys, ys_c, strict=True):
        torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-4)


def raising_compile(*args, **kwargs):
    raise RuntimeError("no compiler here")


def compiled_that_fails(fn, **kwargs):
    def call(*args):
        raise RuntimeError("backend compiler failed")

    return call


@pytest.mark.parametrize("fake_compile", [raising_compile, compiled_that_fails], ids=["compile", "first-call"])
def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog, fake_compile):
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(batched, "_compiled", {})
    monkeypatch.setattr(batched, "_compile_failed", False)
    groups = [group(method) for method in METHODS]
    with caplog.at_level(logging.WARNING, logger="comfyui-tlora"):
        for adapters, weights, x in groups:
            ys, grads = outputs_and_grads(adapters, weights, x, compile=False)
            for _ in range(2):
                ys_c, grads_c = outputs_and_grads(adapters, weights, x, compile=True)
                for a, b in zip([*ys, *grads], [*ys_c, *grads_c], strict=True):
                    assert torch.equal(a, b)
    assert len(caplog.records) == 1 and "building them eagerly" in caplog.text
    assert batched._compile_failed
