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
