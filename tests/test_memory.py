"""The run's memory estimate: what each adapter keeps on the device, and how the parts add up."""

import pytest

from tlora.adapters.soda import rotation_factors
from tlora.memory import ACTIVATION_FACTOR, OPTIMIZER_BYTES, MemoryEstimate, adapter_training_bytes, estimate

OPTIONS = (("regularizer", "none"), ("regularizer_weight", 0.0), ("residual_rank", 8), ("transform_rank", 2))


def test_lora_keeps_its_factors_with_gradients_and_two_moments():
    assert adapter_training_bytes("lora", (320, 768), OPTIONS) == OPTIMIZER_BYTES * 8 * (320 + 768)


def test_soda_keeps_its_svd_besides_its_parameters():
    out, inp = 320, 768
    rank = min(out, inp)
    trainable = rank + sum(k * k for k in rotation_factors(inp, 3))
    svd = out * rank + rank + rank * inp
    assert adapter_training_bytes("soda", (out, inp), OPTIONS) == OPTIMIZER_BYTES * trainable + 4 * svd
    assert adapter_training_bytes("svdiff", (out, inp), OPTIONS) == OPTIMIZER_BYTES * rank + 4 * svd


def test_tlora_counts_its_cores_and_grows_with_the_ranks():
    small = adapter_training_bytes("tlora", (320, 320), OPTIONS)
    larger = adapter_training_bytes("tlora", (320, 320), (*OPTIONS[:2], ("residual_rank", 16), OPTIONS[3]))
    assert 0 < small < larger < OPTIMIZER_BYTES * 320 * 320  # far below a full weight


@pytest.mark.parametrize("checkpointing", [False, True])
def test_floor_streams_every_weight_and_full_holds_them(checkpointing):
    need = estimate(
        "lora",
        [(320, 768)] * 3,
        dict(OPTIONS),
        weights=10_000,
        largest_layer=100,
        inference_activations=1000,
        gradient_checkpointing=checkpointing,
    )
    adapters = 3 * OPTIMIZER_BYTES * 8 * (320 + 768)
    activations = ACTIVATION_FACTOR[checkpointing] * 1000
    assert need == MemoryEstimate(10_000, 100, adapters, activations)
    assert need.floor == adapters + activations + 200 and need.full == adapters + activations + 10_000
    assert ACTIVATION_FACTOR[True] < ACTIVATION_FACTOR[False]
