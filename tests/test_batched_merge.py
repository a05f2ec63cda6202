"""GroupedMerge: every layer's ``W' − W`` as its own merge gives it, the factors of same-shaped
layers built in one batched pass per chunk, with fewer ops per layer and a bounded cache."""

import pytest
import torch

from bench.launches import OpCounter
from tlora import TLoRA, preset
from tlora.batched import build_group
from tlora.batched_merge import GroupedMerge, factor_bytes

SHAPES = [(40, 40), (24, 40), (40, 40), (40, 24), (40, 40), (24, 40)]


def trained(shape, config, seed):
    """A TLoRA adapter with every parameter moved off its identity/zero init (frozen)."""
    adapter = TLoRA(shape, config, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return adapter.requires_grad_(False)


def file_of(config, shapes=SHAPES):
    """``name → (adapter, weight)`` and a GroupedMerge holding them, as one file's layers."""
    gen = torch.Generator().manual_seed(0)
    layers = {f"layer{i}": (trained(s, config, i), torch.randn(s, generator=gen)) for i, s in enumerate(shapes)}
    merge = GroupedMerge(devices=("cpu",))  # CUDA alone by default
    for name, (adapter, _) in layers.items():
        signature = tuple((k, tuple(p.shape)) for k, p in adapter.named_parameters())

        def build(shape, device, adapter=adapter):
            if tuple(shape) != adapter.weight_shape:
                raise ValueError(f"shape {shape} is not this layer's {adapter.weight_shape}")
            return adapter

        merge.add(name, signature, build)
    return layers, merge


CONFIGS = {
    "TLoRA(2,6)": preset("tlora", transform_rank=2, residual_rank=6),
    "TLoRA*(2,4)": preset("tlora_star", transform_rank=2, residual_rank=4),
    "transform(2)": preset("transform", transform_rank=2),
    "residual TR(6)": preset("residual", residual_rank=6),
    "LoRA r=4": preset("lora", residual_rank=4),
}


@pytest.mark.parametrize("method", CONFIGS)
def test_each_layer_gets_its_own_merge(method):
    layers, merge = file_of(CONFIGS[method])
    for name, (adapter, weight) in layers.items():
        delta = merge.delta(name, weight)
        torch.testing.assert_close(delta, adapter.delta_weight(weight), rtol=1e-4, atol=1e-5)
    # one batched pass per group of same-shaped layers: (40,40)×3, (24,40)×2, (40,24)×1
    assert merge.batched_builds == 3
    assert not merge.ahead


def test_a_layer_merged_again_or_out_of_order_gets_its_own_merge():
    layers, merge = file_of(CONFIGS["TLoRA(2,6)"])
    order = ["layer4", "layer0", "layer0", "layer2", "layer5", "layer1", "layer3", "layer4"]
    for name in order:
        adapter, weight = layers[name]
        torch.testing.assert_close(merge.delta(name, weight), adapter.delta_weight(weight), rtol=1e-4, atol=1e-5)


def test_factors_built_ahead_stay_within_the_budget():
    config = CONFIGS["TLoRA(2,6)"]
    layers, merge = file_of(config, [(40, 40)] * 12)
    with torch.no_grad():
        merge.budget = 3 * factor_bytes(build_group([layers["layer0"][0]], None)[0])
    for name, (adapter, weight) in layers.items():
        torch.testing.assert_close(merge.delta(name, weight), adapter.delta_weight(weight), rtol=1e-4, atol=1e-5)
        assert sum(factor_bytes(f) for f in merge.ahead.values()) <= merge.budget
    assert merge.batched_builds == 4  # chunks of 3 layers


def test_a_conv_an_unknown_layer_or_another_device_is_left_to_its_own_path():
    layers, merge = file_of(CONFIGS["TLoRA(2,6)"])
    assert merge.delta("layer0", torch.randn(40, 40, 1, 1)) is None
    assert merge.delta("not in the file", torch.randn(40, 40)) is None
    merge.devices = ("cuda",)
    assert merge.delta("layer0", layers["layer0"][1]) is None
    assert merge.batched_builds == 0


def test_by_default_only_cuda_merges_are_batched():
    assert GroupedMerge().devices == ("cuda",)


def test_fewer_ops_per_layer_than_merging_each_layer_alone():
    """Ops dispatched to merge 16 same-shaped 320-wide TLoRA(2,6) layers: the batched pass
    (one build for all, two matmuls each) against each layer's own merge."""
    config = CONFIGS["TLoRA(2,6)"]
    layers, merge = file_of(config, [(320, 320)] * 16)
    alone, grouped = OpCounter(), OpCounter()
    with torch.no_grad():
        with alone:
            for adapter, weight in layers.values():
                adapter.delta_weight(weight)
        with grouped:
            for name, (_, weight) in layers.items():
                merge.delta(name, weight)
    per_layer_alone, per_layer_grouped = alone.total / 16, grouped.total / 16
    assert per_layer_grouped * 4 <= per_layer_alone, (per_layer_alone, per_layer_grouped)


def test_a_member_added_again_is_replaced_and_a_gone_one_leaves():
    layers, merge = file_of(CONFIGS["TLoRA(2,6)"], [(40, 40)] * 3)
    adapter, weight = layers["layer1"]
    merge.add("layer1", "another signature", lambda shape, device: adapter)  # the same name, edited file
    merge.add("layer2", merge.builders["layer2"][0], lambda shape, device: None)  # its adapter is gone
    torch.testing.assert_close(
        merge.delta("layer0", layers["layer0"][1]),
        layers["layer0"][0].delta_weight(layers["layer0"][1]),
        rtol=1e-4,
        atol=1e-5,
    )
    assert "layer2" not in merge.builders and not merge.ahead  # layer1 is in another group now
    torch.testing.assert_close(merge.delta("layer1", weight), adapter.delta_weight(weight), rtol=1e-4, atol=1e-5)
    assert merge.batched_builds == 2
