"""SODA / SVDiff on the adapter interface: exact init, the formula, paths, conv, dtypes, files."""

import dataclasses
import functools

import pytest
import torch

from tlora import SODA, SODA_PRESETS, combined_weight, soda_optimizers, soda_preset
from tlora.adapters import ConvArgs
from tlora.adapters.soda import kron_apply, rotation_factors
from tlora.factorize import factorize

# (out, in): every width of the budget tables in SD1.5 / SDXL attention shapes (self, and
# cross-attention q/k/v from 768- or 2048-wide text embeddings).
SHAPES = [(320, 320), (640, 640), (1280, 1280), (768, 768), (320, 768), (1280, 768), (640, 2048), (1280, 2048)]
CONFIGS = {
    "soda": SODA_PRESETS["soda"],
    "cayley": soda_preset("soda", rotation="cayley"),
    "svdiff": SODA_PRESETS["svdiff"],
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@functools.cache
def base_weight(shape, seed=0):
    """A weight with a spread spectrum, like a trained layer's."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return w + 0.5 * torch.randn(shape[0], 1, generator=gen) * torch.randn(1, shape[1], generator=gen)


def randomize(adapter, seed=0):
    """Random δ and random rotations (exp of random skew matrices, or Cayley generators)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.delta.normal_(0, 0.1, generator=gen)
        for q in adapter.rotation:
            a = torch.randn(q.shape, generator=gen) * 0.3
            q.copy_(torch.linalg.matrix_exp(a - a.T))
        for a in adapter.cayley:
            a.normal_(0, 0.3, generator=gen)
    return adapter


def reference_apply(adapter, weight, x):
    """``x @ W'ᵀ`` in fp64 by the formula with the dense O, for ``x`` ``[..., in]``:
    ``W' = U diag(ReLU(σ+δ)) Vh Oᵀ + (W − U diag(σ) Vh) Oᵀ``."""
    u, s, vh = (t.double() for t in (adapter.U, adapter.sigma, adapter.Vh))
    z = x.double()
    factors = [q.detach().double() for q in adapter.rotation_factors()]
    if factors:
        z = z @ functools.reduce(torch.kron, factors)  # x·O
    spectral = (z @ vh.T) * torch.relu(s + adapter.delta.double()) @ u.T
    residual = z @ weight.double().flatten(1).T - ((z @ vh.T) * s) @ u.T
    return spectral + residual


def probe_err(adapter, weight, merged):
    """Relative error of ``merged`` against the formula, seen through random probes."""
    probes = torch.randn(16, merged.flatten(1).shape[1], generator=torch.Generator().manual_seed(9))
    return rel_err(probes @ merged.flatten(1).T, reference_apply(adapter, weight, probes))


def test_factor_rule():
    for width, factors in {640: (8, 8, 10), 768: (6, 8, 16), 1280: (4, 16, 20), 2048: (4, 8, 64)}.items():
        assert rotation_factors(width) == factors
    assert rotation_factors(320) == factorize(320, 3, table=None) == (5, 8, 8)
    assert rotation_factors(32 * 9) == (6, 6, 8)  # a 3×3 conv over 32 channels
    assert rotation_factors(331) == (331,)  # a prime: the size-1 factors (identities) are dropped


@pytest.mark.parametrize("shape", SHAPES)
def test_every_width_exact_at_init_then_follows_formula(shape):
    weight = base_weight(shape)
    adapter = SODA(shape)
    assert adapter.factors == rotation_factors(shape[1])
    assert adapter.num_parameters() == min(shape) + sum(k * k for k in adapter.factors)
    assert torch.equal(adapter.merged_weight(weight), weight)  # bit for bit
    randomize(adapter)
    merged = adapter.merged_weight(weight)
    assert probe_err(adapter, weight, merged) < 1e-5
    assert rel_err(merged, weight) > 1e-2


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_methods_exact_at_init(method):
    shape = (320, 768)
    adapter = SODA(shape, CONFIGS[method])
    weight = base_weight(shape)
    assert torch.equal(adapter.merged_weight(weight), weight)
    assert torch.equal(adapter.delta_weight(weight), torch.zeros(shape))
    assert adapter.method == ("svdiff" if method == "svdiff" else "soda")


def test_reference_init_option():
    shape = (320, 768)
    weight = base_weight(shape)
    adapter = SODA(shape, soda_preset("soda", delta_init=1e-3))
    torch.testing.assert_close(adapter.delta, torch.full((320,), 1e-3))
    merged = adapter.merged_weight(weight)
    shift = adapter.U @ adapter.Vh * 1e-3  # U diag(1e-3) Vh, O = I
    assert rel_err(merged - weight, shift) < 1e-3


def test_svdiff_has_no_rotation():
    adapter = SODA((320, 768), SODA_PRESETS["svdiff"])
    assert adapter.factors == () and list(adapter.state_dict()) == ["delta", "base_fingerprint"]
    assert adapter.num_parameters() == 320


def test_relu_clamps_the_spectrum():
    shape = (64, 48)
    weight = base_weight(shape)
    adapter = SODA(shape, SODA_PRESETS["svdiff"])
    adapter.bind(weight)
    with torch.no_grad():
        adapter.delta.copy_(-adapter.sigma - 1.0)
    assert torch.equal(adapter.spectrum(), torch.zeros(48))
    assert adapter.merged_weight(weight).abs().max().item() < 1e-5  # only the tiny residual is left


@pytest.mark.parametrize("factors", [(8, 8, 10), (6, 8, 16), (4, 8, 64), (5, 8, 8), (2, 3), (7,)])
def test_modewise_rotation_equals_dense_kronecker(factors):
    gen = torch.Generator().manual_seed(0)
    qs = [torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0] for k in factors]
    dense = functools.reduce(torch.kron, qs)
    x = torch.randn(3, 5, dense.shape[0], generator=gen, dtype=torch.float64)
    assert rel_err(kron_apply(x, qs), x @ dense.T) < 1e-6
    assert rel_err(kron_apply(x, [q.T for q in qs]), x @ dense) < 1e-6


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_paths_agree_with_merged_formula_values_and_gradients(method):
    shape = (320, 768)
    weight, bias = base_weight(shape), torch.randn(320)
    x = torch.randn(2, 77, 768)
    results = {}
    for path in ("merged", "activations"):
        adapter = randomize(SODA(shape, dataclasses.replace(CONFIGS[method], path=path)))
        y = adapter(x, weight, bias)
        y.square().mean().backward()
        results[path] = (y.detach(), [p.grad.clone() for p in adapter.parameters()])
        expected = reference_apply(adapter, weight, x) + bias
        assert rel_err(y, expected) < 1e-5
    (y_m, g_m), (y_a, g_a) = results["merged"], results["activations"]
    assert rel_err(y_a, y_m) < 1e-5
    for gm, ga in zip(g_m, g_a, strict=True):
        assert rel_err(ga, gm) < 1e-3


def test_auto_path_follows_token_count():
    self_attention = SODA((640, 640))
    cross_attention_kv = SODA((640, 768))
    assert self_attention.choose_path(4096) == "merged"
    assert cross_attention_kv.choose_path(77) == "activations"


def test_low_precision_input_keeps_its_dtype():
    shape = (320, 768)
    weight = base_weight(shape).half()
    adapter = randomize(SODA(shape, soda_preset("soda", path="activations")))
    x = torch.randn(4, 768).half()
    y = adapter(x, weight)
    assert y.dtype == torch.float16
    expected = x.float() @ adapter.merged_weight(weight).T
    assert rel_err(y, expected) < 2e-3


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv(method, kernel):
    conv = torch.nn.Conv2d(32, 24, kernel, padding=kernel // 2)
    weight = conv.weight.detach()
    adapter = SODA(weight.shape, CONFIGS[method])
    assert torch.equal(adapter.merged_weight(weight), weight)
    randomize(adapter)
    assert adapter.factors == (rotation_factors(32 * kernel * kernel) if method != "svdiff" else ())
    merged = adapter.merged_weight(weight)
    assert merged.shape == weight.shape
    assert probe_err(adapter, weight, merged) < 1e-5
    x = torch.randn(2, 32, 9, 9)
    expected = torch.nn.functional.conv2d(x, merged, conv.bias, padding=kernel // 2)
    assert rel_err(adapter(x, weight, conv.bias, ConvArgs.of(conv)), expected) < 1e-6


def test_fp16_base_gives_the_fp32_result():
    shape = (640, 768)
    w32 = base_weight(shape)
    w16 = w32.half()
    state = randomize(SODA(shape)).state_dict()
    adapters = {}
    for name, w in (("fp16", w16), ("fp16 as fp32", w16.float()), ("fp32", w32)):
        adapters[name] = SODA(shape)
        adapters[name].load_state_dict(state, strict=False)
        adapters[name].bind(w)
    x = torch.randn(8, 768)
    # the same values in another dtype: the same SVD and the same result
    assert torch.equal(adapters["fp16"].sigma, adapters["fp16 as fp32"].sigma)
    assert torch.equal(adapters["fp16"].merged_weight(w16), adapters["fp16 as fp32"].merged_weight(w16.float()))
    activations = soda_preset("soda", path="activations")
    for a in adapters.values():
        a.config = activations
    assert torch.equal(adapters["fp16"](x, w16), adapters["fp16 as fp32"](x, w16.float()))
    # the fp32 original: same fingerprint, result equal up to the fp16 rounding of the base
    assert int(adapters["fp32"].base_fingerprint) == int(adapters["fp16"].base_fingerprint)
    assert rel_err(adapters["fp16"].merged_weight(w16), adapters["fp32"].merged_weight(w32)) < 1e-3


def test_saved_tensors_and_reload():
    shape = (320, 768)
    weight = base_weight(shape)
    trained = randomize(SODA(shape))
    expected = trained.merged_weight(weight)
    state = trained.state_dict()
    assert set(state) == {"delta", "base_fingerprint", "rotation.0", "rotation.1", "rotation.2"}
    assert int(state["base_fingerprint"]) != 0

    loaded = SODA(shape)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.merged_weight(weight), expected)  # SVD recomputed from the base

    other = base_weight(shape, seed=1)
    stranger = SODA(shape)
    stranger.load_state_dict(state)
    with pytest.raises(ValueError, match="different base weights"):
        stranger.merged_weight(other)
    with pytest.warns(UserWarning):
        stranger.bind(other, on_mismatch="warn")
    assert int(stranger.base_fingerprint) == int(state["base_fingerprint"])  # the record is kept

    # loading into an adapter already bound to other weights checks again on next use
    bound = SODA(shape)
    bound.bind(other)
    bound.load_state_dict(state)
    with pytest.raises(ValueError):
        bound.merged_weight(other)
    assert torch.equal(bound.merged_weight(weight), expected)


def test_combining_adds_weight_deltas():
    shape = (320, 768)
    weight = base_weight(shape)
    first, second = randomize(SODA(shape), seed=1), randomize(SODA(shape), seed=2)
    combined = combined_weight(weight, [first, second], [1.0, 0.5])
    expected = weight + first.delta_weight(weight) + 0.5 * second.delta_weight(weight)
    torch.testing.assert_close(combined, expected)
    torch.testing.assert_close(combined_weight(weight, [first]), first.merged_weight(weight))
    averaged_q = (first.rotation[0] + second.rotation[0]) / 2  # what must not be done
    assert (averaged_q.T @ averaged_q - torch.eye(averaged_q.shape[0])).norm() > 0.1
    with pytest.raises(ValueError):
        combined_weight(weight, [first, second], [1.0])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_training_recovers_a_teacher(method):
    """Fit a random SODA teacher on the same base: loss falls, factors stay orthogonal."""
    shape = (48, 40)
    weight = base_weight(shape)
    config = CONFIGS[method]
    teacher = randomize(SODA(shape, config), seed=5)
    with torch.no_grad():
        teacher.delta.mul_(5)
    student = SODA(shape, config)
    x = torch.randn(256, 40, generator=torch.Generator().manual_seed(6))
    target = x @ teacher.merged_weight(weight).detach().T
    opts = soda_optimizers(student, lr_delta=2e-2, lr_rotation=1e-2)

    def loss():
        return (student(x, weight) - target).square().mean()

    start = loss().item()
    for _ in range(300):
        for opt in opts:
            opt.zero_grad()
        loss().backward()
        for opt in opts:
            opt.step()
    assert loss().item() < 1e-3 * start
    for q in student.rotation_factors():
        q = q.detach().double()
        assert (q.T @ q - torch.eye(q.shape[0], dtype=q.dtype)).norm().item() < 1e-5
