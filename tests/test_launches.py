"""Launch overhead of a training step (issue #16): the ops dispatched per ``Trainer.train_step``
stay within their targets (counted by bench/launches.py), and every rewrite that cut them
computes what the per-layer, per-tensor code computed: the batched factor builds (TLoRA and
SODA), the gradient hand-out of their stacked leaves, the fused Adam steps, StiefelAdam's
padded buckets and the regularizers per group."""

import math

import pytest
import torch

from bench import launches
from bench.shapes import SDXL
from tlora import SODA, StiefelAdam, TLoRA, preset, soda_preset
from tlora.batched import gathered, prepared, regularizer
from tlora.model import attached
from tlora.options import TrainingOptions
from tlora.stiefel import polar
from tlora.train import Trainer

TARGET = 1.5  # issue #16: ops per step ≤ 1.5× LoRA r=4's, batched path, tiny set and SDXL layers


# -- the counts --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_counts():
    return launches.count_all("tiny", ("LoRA r=4", "TLoRA(2,6)", "SODA"))


@pytest.mark.parametrize("method", ["TLoRA(2,6)", "SODA"])
def test_ops_per_step_on_the_tiny_set_within_target(tiny_counts, method):
    ratio = tiny_counts[(method, "batched")] / launches.reference_count(tiny_counts)
    assert ratio <= TARGET, f"{method}: {ratio:.3f}× LoRA r=4's ops per step"


def test_batched_path_cuts_ops_per_step(tiny_counts):
    """The batched path is the cheap one; before issue #16 it cost 2,597 ops for TLoRA and
    SODA's plain path 2,111 against LoRA's 767 (plain) on this set."""
    for method in ("TLoRA(2,6)", "SODA"):
        assert tiny_counts[(method, "batched")] < 0.5 * tiny_counts[(method, "plain")]
    assert tiny_counts[("LoRA r=4", "plain")] < 500


def test_batched_layers_cost_no_more_ops_than_plain_lora_layers(tiny_counts):
    """Per adapted layer (the count's growth from 8 to 16 layers), the batched TLoRA and SODA
    dispatch no more ops than a LoRA on its own path: what they add is per group of layers."""
    eight = launches.count_all_on(launches.tiny(layers=8), ("LoRA r=4", "TLoRA(2,6)", "SODA"))
    per_layer = {key: (tiny_counts[key] - eight[key]) / 8 for key in eight}
    lora = per_layer[("LoRA r=4", "plain")]
    for method in ("LoRA r=4", "TLoRA(2,6)", "SODA"):
        assert per_layer[(method, "batched")] <= lora, per_layer


@pytest.fixture(scope="module")
def sdxl_counts():
    """SDXL's four layer shapes in 2 + 6 transformer blocks (64 adapted layers): the
    full set's groups with fewer layers to share each group's build, so a stricter ratio."""
    layer_set = launches.sdxl(blocks=(2, 6))
    return {
        (method, mode): launches.count_step(layer_set, method, mode).total
        for method, mode in [
            ("LoRA r=4", "plain"),
            ("LoRA r=4", "batched"),
            ("TLoRA(2,6)", "batched"),
            ("SODA", "batched"),
        ]
    }


@pytest.mark.parametrize("method", ["TLoRA(2,6)", "SODA"])
def test_ops_per_step_on_sdxl_layers_within_target(sdxl_counts, method):
    ratio = sdxl_counts[(method, "batched")] / launches.reference_count(sdxl_counts)
    assert ratio <= TARGET, f"{method}: {ratio:.3f}× LoRA r=4's ops per step"


def test_the_sdxl_layer_set_is_sdxls():
    model = launches.sdxl().model
    shapes = sorted((m.out_features, m.in_features) for m in model.modules() if getattr(m, "adapted", False))
    assert shapes == sorted((out, inp) for _, out, inp in SDXL)


def optimizer_ops(method: str, layers: int) -> int:
    """Ops of the trainer's optimizer steps (a warm-up step first) over ``layers`` layers."""
    adapters = {str(i): launches.METHODS[method]((40, 40)) for i in range(layers)}
    for a in adapters.values():
        if isinstance(a, SODA):
            a.bind(torch.randn(40, 40))
    trainer = Trainer(adapters, TrainingOptions(steps=2))
    counter = launches.OpCounter()
    for counting in (False, True):
        for p in trainer.parameters():
            p.grad = torch.ones_like(p)
        with counter if counting else torch.no_grad():
            for opt in trainer.optimizers:
                opt.step()
    return counter.total


@pytest.mark.parametrize("method", ["TLoRA(2,6)", "SODA"])
def test_optimizer_ops_do_not_grow_with_the_tensors(method):
    assert optimizer_ops(method, 2) == optimizer_ops(method, 12)


# -- same results --------------------------------------------------------------------------------
def perturbed(adapter, seed):
    """An adapter whose parameters moved off their init (SODA rotations stay orthogonal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            if name.startswith("rotation."):
                p.copy_(polar(p))
    return adapter


SODA_CONFIGS = {
    "soda": soda_preset("soda"),
    "cayley": soda_preset("soda", rotation="cayley"),
    "svdiff": soda_preset("svdiff"),
}


def soda_layers(config_name, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen) / s[1] ** 0.5 for s in shapes]
    adapters = [perturbed(SODA(s, SODA_CONFIGS[config_name]), seed + i) for i, s in enumerate(shapes)]
    for a, w in zip(adapters, weights, strict=True):
        a.bind(w)
    return adapters, weights


def outputs_and_grads(adapters, weights, biases, x, batched):
    for a in adapters:
        a.zero_grad()
    with prepared(adapters) if batched else torch.enable_grad():
        ys = [a(x, w, b) for a, w, b in zip(adapters, weights, biases, strict=True)]
    sum((y**2).sum() for y in ys).backward()
    return ys, [[p.grad.clone() for p in a.parameters()] for a in adapters]


@pytest.mark.parametrize("config_name", sorted(SODA_CONFIGS))
def test_batched_soda_equals_its_own_path(config_name):
    shapes = [(48, 40), (48, 40), (24, 40), (48, 40)]
    adapters, weights = soda_layers(config_name, shapes)
    biases = [torch.randn(s[0]) if i % 2 else None for i, s in enumerate(shapes)]
    x = torch.randn(3, 7, 40)
    ys, grads = outputs_and_grads(adapters, weights, biases, x, batched=False)
    with prepared(adapters):
        assert all(a.prepared is not None for a in adapters)
    ys_b, grads_b = outputs_and_grads(adapters, weights, biases, x, batched=True)
    for y, y_b in zip(ys, ys_b, strict=True):
        assert y_b.shape == y.shape
        torch.testing.assert_close(y_b, y, atol=2e-5, rtol=1e-4)
    for g, g_b in zip(grads, grads_b, strict=True):
        for a, b in zip(g, g_b, strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


def test_batched_soda_is_the_base_layer_at_init_and_keeps_low_precision():
    shapes = [(48, 40)] * 3
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen) / 7 for s in shapes]
    adapters = [SODA(s) for s in shapes]
    for a, w in zip(adapters, weights, strict=True):
        a.bind(w)
    x = torch.randn(5, 40, generator=gen)
    with prepared(adapters):
        excess = adapters[0].prepared[0]
        assert torch.equal(excess, torch.zeros_like(excess))  # O = I exactly
        for a, w in zip(adapters, weights, strict=True):
            torch.testing.assert_close(a(x, w), x @ w.T, atol=1e-5, rtol=1e-5)
            assert a(x.half(), w.half()).dtype == torch.float16


def test_gathered_leaf_hands_its_gradient_to_the_parameters():
    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(4)]
    stacked = gathered(params)
    assert stacked.is_leaf and stacked.requires_grad
    weights = torch.randn(4, 3, 2)
    (stacked * weights).sum().backward()
    for p, w in zip(params, weights, strict=True):
        torch.testing.assert_close(p.grad, w)
        assert p.grad.is_contiguous()  # fused Adam reads non-contiguous gradients wrongly
    gathered(params).sum().backward()  # a second backward adds to what they hold
    for p, w in zip(params, weights, strict=True):
        torch.testing.assert_close(p.grad, w + 1)
    with torch.no_grad():
        assert not gathered(params).requires_grad


def trained(method, batched, steps=4, accumulation=2, config=None):
    """Train a small stack of same-shaped layers (plain or batched path); return the state before and after."""
    gen = torch.Generator().manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(40, 40) for _ in range(3)]).requires_grad_(False)
    with torch.no_grad():
        for p in layers.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / 6)
    modules = {str(i): m for i, m in enumerate(layers)}
    if method in SODA_CONFIGS:
        adapters = {n: SODA(m.weight.shape, SODA_CONFIGS[method]) for n, m in modules.items()}
        for n, a in adapters.items():
            a.bind(modules[n].weight)
    else:
        adapters = {
            n: TLoRA(m.weight.shape, preset(method, **(config or {})), seed=i)
            for i, (n, m) in enumerate(modules.items())
        }
    attached(modules, adapters).__enter__()  # the toy keeps its adapters for good
    data = torch.randn(8, 5, 40, generator=gen)

    def loss(step, micro):
        with prepared(adapters.values()) if batched else torch.enable_grad():
            return (layers(data[(step + micro) % 8]) - 0.1).square().mean()

    cfg = TrainingOptions(steps=steps, learning_rate=1e-2, rotation_learning_rate=1e-2, grad_accumulation=accumulation)

    def state() -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v.detach().clone() for n, a in adapters.items() for k, v in a.state_dict().items()}

    before = state()
    trainer = Trainer(adapters, cfg)
    while not trainer.done:
        trainer.train_step(loss)
    return before, state()


@pytest.mark.parametrize("method", ["tlora", "lora", "soda", "cayley", "svdiff"])
def test_batched_training_follows_the_plain_path(method):
    before, plain = trained(method, batched=False)
    _, batched = trained(method, batched=True)
    watched = [k for k in plain if k.endswith((".delta", "transform.0", "lora_up"))]
    assert watched and all(not torch.equal(plain[k], before[k]) for k in watched), "the parameters did not move"
    for k in plain:
        torch.testing.assert_close(batched[k], plain[k], atol=1e-5, rtol=1e-4)


def reference_stiefel_step(x, grad, state, lr, betas=(0.9, 0.999), eps=1e-5):
    """StiefelAdam for one matrix, as the module docstring of tlora.stiefel writes it."""
    state["step"] = state.get("step", 0) + 1
    state.setdefault("m", torch.zeros_like(x))
    state.setdefault("v", torch.zeros_like(x))
    g = x.T @ grad - grad.T @ x
    state["m"] = betas[0] * state["m"] + (1 - betas[0]) * g
    state["v"] = betas[1] * state["v"] + (1 - betas[1]) * g * g
    m_hat = state["m"] / (1 - betas[0] ** state["step"])
    v_hat = state["v"] / (1 - betas[1] ** state["step"])
    xi = lr * m_hat / (v_hat.sqrt() + eps)
    u, _, vh = torch.linalg.svd((x - x @ xi).double())
    return (u @ vh).float()


@pytest.mark.parametrize("method", ["tlora", "soda"])
def test_trainer_steps_like_per_tensor_adamw(method):
    """The fused AdamW (and padded StiefelAdam) give the updates of torch's per-tensor AdamW
    (and the textbook StiefelAdam) on the same gradients, clipping included."""
    steps, lr = 4, 1e-2
    gen = torch.Generator().manual_seed(2)
    shapes = [(40, 40), (40, 40), (24, 40)]
    weights = [torch.randn(s, generator=gen) / 6 for s in shapes]
    x = torch.randn(6, 40, generator=gen)

    def make():
        if method == "soda":
            adapters, _ = soda_layers("soda", shapes)
            return {str(i): a for i, a in enumerate(adapters)}
        return {str(i): perturbed(TLoRA(s, preset("tlora")), i) for i, s in enumerate(shapes)}

    def loss_of(adapters):
        return sum(a(x, w).square().mean() for a, w in zip(adapters.values(), weights, strict=True))

    ours = make()
    cfg = TrainingOptions(steps=steps, learning_rate=lr, rotation_learning_rate=lr, grad_clip=0.5)
    trainer = Trainer(ours, cfg)
    for _ in range(steps):
        trainer.train_step(lambda step, micro: loss_of(ours))

    ref = make()
    rotations = [p for a in ref.values() for n, p in a.named_parameters() if n.startswith("rotation.")]
    others = [p for a in ref.values() for n, p in a.named_parameters() if not n.startswith("rotation.")]
    adamw = torch.optim.AdamW(others, lr=lr, weight_decay=cfg.weight_decay, foreach=False)
    states = [{} for _ in rotations]
    for _ in range(steps):
        loss_of(ref).backward()
        torch.nn.utils.clip_grad_norm_(others + rotations, cfg.grad_clip, foreach=False)
        adamw.step()
        with torch.no_grad():
            for q, state in zip(rotations, states, strict=True):
                q.copy_(reference_stiefel_step(q, q.grad, state, lr))
        for p in others + rotations:
            p.grad = None
    untrained = make()
    for a, b, c in zip(ours.values(), ref.values(), untrained.values(), strict=True):
        for (name, p), q, p0 in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
            assert not torch.equal(p, p0), f"{name} did not move"


def test_padded_stiefel_buckets_equal_one_matrix_at_a_time():
    """Sizes 4…20 share buckets (identity-padded to the largest); each matrix moves exactly as
    if it were alone, over steps with different gradients."""
    sizes = [4, 5, 8, 8, 10, 16, 20, 64]
    gen = torch.Generator().manual_seed(3)
    start = [polar(torch.eye(k) + 0.1 * torch.randn(k, k, generator=gen)) for k in sizes]
    together = [torch.nn.Parameter(q.clone()) for q in start]
    alone = [torch.nn.Parameter(q.clone()) for q in start]
    opt = StiefelAdam(together, lr=3e-2)
    opts = [StiefelAdam([q], lr=3e-2) for q in alone]
    assert len(opt.state) == 0
    for _ in range(5):
        grads = [torch.randn(k, k, generator=gen) for k in sizes]
        for group in (together, alone):
            for q, g in zip(group, grads, strict=True):
                q.grad = g.clone()
        opt.step()
        for o in opts:
            o.step()
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.T @ a, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
    moments = {opt.state[q]["exp_avg"]._base.data_ptr() for q in together if q.shape[0] <= 8}
    assert len(moments) == 1  # 4, 5 and 8 in one bucket: one tensor of moments


def test_regularizers_per_group_equal_the_sum_per_layer():
    adapters = []
    for kind in ("identity", "orthogonal"):
        for seed in range(3):
            config = preset("tlora", regularizer=kind, regularizer_weight=0.3)
            adapters.append(perturbed(TLoRA((24, 24), config, seed=seed), seed))
    adapters.append(TLoRA((24, 24), preset("tlora"), seed=9))  # no regularizer
    total = regularizer(adapters)
    expected = sum(a.regularizer() for a in adapters if a.has_regularizer)
    torch.testing.assert_close(total, expected, atol=1e-6, rtol=1e-5)
    total.backward()
    for a in adapters[:-1]:
        assert a.transform[0].grad is not None and a.transform[0].grad.abs().sum() > 0
    assert regularizer(adapters[-1:]) is None
    assert math.isfinite(total.item())
