"""The cost model's arithmetic counts against what the code actually multiplies."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tlora import TLoRA, cost, preset, trm

CASES = [
    ((96, 120), preset("tlora")),  # factors (4, 5, 6), ring rank 2, TR residual
    ((64, 60), preset("tlora", transform_rank=1, residual_rank=2)),  # a Kronecker transform
    ((40, 64), preset("tlora_star")),
    ((48, 48), preset("tlora", num_factors=2)),
]


def counted_macs(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(("shape", "config"), CASES)
def test_contraction_macs_count_the_mode_wise_merge(shape, config):
    adapter = TLoRA(shape, config)
    weight = torch.randn(shape)
    counted = counted_macs(lambda: trm.apply_to_weight(weight, adapter.cores()))
    assert cost.contraction_macs(shape[0], adapter.cost_shape) == counted


@pytest.mark.parametrize(("shape", "config"), CASES)
def test_merge_macs_is_a_floor_of_the_merge(shape, config):
    adapter = TLoRA(shape, config)
    weight = torch.randn(shape)
    residual = shape[0] * shape[1] * adapter.cost_shape.residual_rank
    assert residual < cost.merge_macs(adapter.cost_shape) <= counted_macs(lambda: adapter.merged_weight(weight))


def test_merge_macs_of_a_lora_is_its_product():
    adapter = TLoRA((30, 48), preset("lora"))
    counted = counted_macs(lambda: adapter.merged_weight(torch.randn(30, 48)))
    assert cost.merge_macs(adapter.cost_shape) == 30 * 48 * 4 == counted


def calls_of(monkeypatch, module, name) -> list:
    """Record each call of ``module.name`` (still calling it)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize(("shape", "dense"), [((320, 320), True), ((320, 768), False), ((1280, 10240), False)])
def test_merge_route_follows_the_cost_model(monkeypatch, shape, dense):
    """``W·T`` goes through a dense T exactly when the model prices it cheaper (and T fits)."""
    adapter = TLoRA(shape, preset("tlora"))
    price = cost.materialize_cost(adapter.cost_shape) + shape[0] * shape[1] ** 2
    fits = shape[1] ** 2 <= cost.MAX_DENSE_ELEMENTS
    assert (
        cost.dense_merge_is_cheaper(adapter.cost_shape)
        == dense
        == (fits and price < cost.contraction_cost(shape[0], adapter.cost_shape))
    )
    built = calls_of(monkeypatch, trm, "materialize")
    mode_wise = calls_of(monkeypatch, trm, "apply_to_weight")
    with torch.no_grad():
        adapter.merged_weight(torch.randn(shape))
    assert (len(built), len(mode_wise)) == ((1, 0) if dense else (0, 1))


@pytest.mark.parametrize("tokens", [16, 256, 65536])
def test_training_forward_takes_the_cheapest_path(monkeypatch, tokens):
    """The path of each forward is the argmin of path_costs, and it changes with the token count."""
    adapter = TLoRA((320, 320), preset("tlora"))
    costs = cost.path_costs(tokens, adapter.cost_shape)
    expected = min(costs, key=costs.__getitem__)
    assert adapter.choose_path(tokens) == expected == {16: "contract", 256: "transform", 65536: "merged"}[tokens]
    contracted = calls_of(monkeypatch, trm, "apply")
    built = calls_of(monkeypatch, trm, "materialize")
    merged = calls_of(monkeypatch, adapter, "merged_weight")
    adapter(torch.randn(tokens, 320), torch.randn(320, 320))
    took = "merged" if merged else "contract" if contracted else "transform" if built else "none"
    assert took == expected
