"""The TLoRA family on the adapter interface: merge, training paths, conv, dtypes, names."""

import pytest
import torch

from tlora import PRESETS, TLoRA, preset
from tlora.adapters import ConvArgs

METHODS = sorted(PRESETS)


def randomize(adapter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return adapter


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(320, 320), (640, 768), (64, 32, 3, 3), (96, 40, 1, 1)])
def test_identity_at_init(method, shape):
    weight = torch.randn(shape)
    adapter = TLoRA(shape, PRESETS[method])
    torch.testing.assert_close(adapter.merged_weight(weight), weight, atol=2e-6, rtol=1e-6)


def reference_merge(adapter, weight):
    """The formula itself: W·T + s·Δ with dense T and Δ."""
    flat = weight.double().flatten(1)
    cfg = adapter.config
    if cfg.transform_rank:
        flat = flat @ adapter.transform_matrix().double()
    factors = adapter.residual_factors()
    if factors is not None:
        flat = flat + cfg.scale * (factors[0].double() @ factors[1].double())
    return flat.reshape(weight.shape)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["merged", "transform", "contract"])
def test_linear_paths_equal_formula(method, path):
    weight, bias = torch.randn(320, 768), torch.randn(320)
    adapter = randomize(TLoRA(weight.shape, preset(method, path=path)))
    merged = adapter.merged_weight(weight)
    assert rel_err(merged, reference_merge(adapter, weight).float()) < 1e-5
    x = torch.randn(2, 77, 768)
    expected = x @ merged.T + bias
    assert rel_err(adapter(x, weight, bias), expected) < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv(method, kernel):
    conv = torch.nn.Conv2d(16, 24, kernel, padding=kernel // 2)
    adapter = randomize(TLoRA(conv.weight.shape, PRESETS[method]))
    merged = adapter.merged_weight(conv.weight)
    assert rel_err(merged, reference_merge(adapter, conv.weight.detach()).float()) < 1e-5
    x = torch.randn(2, 16, 8, 8)
    expected = torch.nn.functional.conv2d(x, merged, conv.bias, padding=kernel // 2)
    assert rel_err(adapter(x, conv.weight, conv.bias, ConvArgs.of(conv)), expected) < 1e-5


def test_conv_transform_acts_on_flattened_fan_in():
    adapter = TLoRA((8, 4, 3, 3), preset("transform"))
    assert adapter.in_features == 36 and adapter.transform_matrix().shape == (36, 36)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_is_merged_in_fp32(dtype):
    weight = torch.randn(128, 64).to(dtype)
    adapter = randomize(TLoRA(weight.shape, PRESETS["tlora"]))
    merged = adapter.merged_weight(weight)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, adapter.merged_weight(weight.float()))
    x = torch.randn(5, 64).to(dtype)
    for path in ("merged", "contract"):
        adapter.config = preset("tlora", path=path)
        y = adapter(x, weight)
        assert y.dtype == dtype
        assert rel_err(y.float(), x.float() @ merged.T) < 2e-2


def test_gradients_only_on_adapter_tensors():
    weight = torch.randn(64, 64, requires_grad=False)
    adapter = TLoRA(weight.shape, PRESETS["tlora"])
    adapter(torch.randn(4, 64), weight).pow(2).sum().backward()
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert weight.grad is None
    assert grads["transform.0"].abs().sum() > 0 and grads["residual_out.0"].abs().sum() > 0


def test_stable_tensor_names():
    names = {m: sorted(TLoRA((320, 768), PRESETS[m]).state_dict()) for m in METHODS}
    assert names["tlora"] == [f"residual_in.{d}" for d in range(3)] + [f"residual_out.{d}" for d in range(3)] + [
        f"transform.{d}" for d in range(3)
    ]
    assert names["tlora_star"] == ["lora_down", "lora_up"] + [f"transform.{d}" for d in range(3)]
    assert names["lora"] == ["lora_down", "lora_up"]
    assert names["transform"] == [f"transform.{d}" for d in range(3)]
    assert names["residual"] == [f"residual_in.{d}" for d in range(3)] + [f"residual_out.{d}" for d in range(3)]


def test_parameter_counts():
    # 320 → 4·8·10 (Σ I² = 180, Σ I = 22); 768 → 8·8·12 (Σ I² = 272, Σ I = 28)
    assert TLoRA((320, 768), preset("tlora", transform_rank=2, residual_rank=6)).num_parameters() == 4 * 272 + 36 * 50
    assert TLoRA((320, 768), preset("lora", residual_rank=4)).num_parameters() == 4 * (320 + 768)
    assert TLoRA((320, 320), preset("tlora_star")).num_parameters() == 4 * 180 + 4 * 640


def test_lora_scale_and_rank_override():
    assert preset("lora").scale == 1.0
    assert preset("lora", residual_rank=8).scale == 1.0
    assert preset("tlora").scale == pytest.approx(1 / 6**0.5)


@pytest.mark.parametrize("kind", ["identity", "orthogonal"])
def test_regularizer(kind):
    adapter = TLoRA((64, 64), preset("tlora", regularizer=kind, regularizer_weight=0.5))
    assert adapter.regularizer().item() == 0.0
    randomize(adapter)
    assert adapter.regularizer().item() > 0.0
    assert TLoRA((64, 64), PRESETS["lora"]).regularizer().item() == 0.0


def test_wrong_weight_shape_is_reported():
    with pytest.raises(ValueError, match=r"built for a weight of shape \(64, 32\)"):
        TLoRA((64, 32)).merged_weight(torch.randn(32, 64))


def test_invalid_configs():
    with pytest.raises(ValueError, match="unknown method"):
        preset("dora")
    with pytest.raises(ValueError, match="needs a transform"):
        preset("residual", residual_rank=0)


@pytest.mark.parametrize("method", ["tlora", "tlora_star", "transform", "residual", "lora", "soda", "svdiff"])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_bypass_equals_the_merged_layer(method, strength):
    """The bypass form (no merge, the frozen layer's own forward) gives the merged layer's output."""
    from tlora import METHODS, PRESETS, soda_preset

    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 40)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 48, generator=gen) / 7)
    cls = METHODS[method]
    adapter = cls((40, 48), soda_preset(method) if method in ("soda", "svdiff") else PRESETS[method])
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        if method == "soda":
            adapter.rotation[0].copy_(torch.linalg.qr(torch.randn(adapter.rotation[0].shape, generator=gen))[0])
    x = torch.randn(5, 7, 48, generator=gen)
    with torch.no_grad():
        merged = layer.weight + strength * adapter.delta_weight(layer.weight)
        expected = torch.nn.functional.linear(x, merged, layer.bias)
        got = adapter.bypass(x, layer, lambda: layer.weight, None, strength)
        assert not torch.allclose(expected, layer(x), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
