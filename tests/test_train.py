"""The host-independent training loop: it learns, it is deterministic, it resumes exactly,
and it refuses bad settings and non-finite losses."""

import math

import pytest
import torch
from torch import nn

from tlora import PRESETS, SODA, TLoRA, preset, soda_preset
from tlora.model import attached
from tlora.options import TrainingOptions
from tlora.train import NonFiniteLossError, Trainer, dco_loss, step_generator


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.to_q = nn.Linear(24, 24)
        self.to_out = nn.Linear(24, 8)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) / 5
        self.requires_grad_(False)

    def forward(self, x):
        return self.to_out(torch.tanh(self.to_q(x)))


DATA = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
TARGET = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))


def make(method):
    model = Toy()
    modules = {"to_q": model.to_q, "to_out": model.to_out}
    if method == "soda":
        adapters = {n: SODA(m.weight.shape, soda_preset("soda")) for n, m in modules.items()}
        for n, a in adapters.items():
            a.bind(modules[n].weight)
    else:
        adapters = {n: TLoRA(m.weight.shape, PRESETS[method]) for n, m in modules.items()}
    attached(modules, adapters).__enter__()  # the toy keeps its adapters for good
    return model, adapters


def micro_loss(model, batch_size=4):
    def loss(step, micro):
        gen = step_generator(7, step, micro)
        idx = torch.randperm(len(DATA), generator=gen)[:batch_size]
        noise = 0.01 * torch.randn(batch_size, 24, generator=gen)
        return (model(DATA[idx] + noise) - TARGET[idx]).pow(2).mean()

    return loss


def run(method, steps, config=None, trainer=None, model=None):
    if trainer is None:
        model, adapters = make(method)
        trainer = Trainer(
            adapters, config or TrainingOptions(steps=steps, learning_rate=3e-2, rotation_learning_rate=3e-2)
        )
    while trainer.step < steps:
        trainer.train_step(micro_loss(model))
    return model, trainer


@pytest.mark.parametrize("method", ["tlora", "tlora_star", "lora", "transform", "residual", "soda"])
def test_loss_goes_down(method):
    _, trainer = run(method, 40)
    first, last = sum(trainer.losses[:5]) / 5, sum(trainer.losses[-5:]) / 5
    assert last < 0.8 * first


def snapshot(trainer):
    return {f"{n}.{k}": v.detach().clone() for n, a in trainer.adapters.items() for k, v in a.state_dict().items()}


@pytest.mark.parametrize("method", ["tlora", "soda"])
def test_same_seed_same_adapter(method):
    _, a = run(method, 8)
    _, b = run(method, 8)
    sa, sb = snapshot(a), snapshot(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["tlora", "soda"])
def test_resume_equals_training_at_once(method, tmp_path):
    config = TrainingOptions(
        steps=10, learning_rate=3e-2, rotation_learning_rate=3e-2, schedule="cosine", warmup_steps=2
    )
    _, straight = run(method, 10, config)

    _, first = run(method, 4, config)
    first.save_state(tmp_path / "state.safetensors")
    saved = snapshot(first)
    model2, adapters2 = make(method)
    for n, a in adapters2.items():
        a.load_state_dict({k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == n})
    resumed = Trainer(adapters2, config)
    resumed.load_state(tmp_path / "state.safetensors")
    assert resumed.step == 4 and resumed.losses == first.losses
    run(method, 10, trainer=resumed, model=model2)
    s1, s2 = snapshot(straight), snapshot(resumed)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], atol=1e-6, rtol=1e-5)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)


def test_non_finite_loss_stops_without_touching_adapters():
    model, adapters = make("tlora")
    trainer = Trainer(adapters, TrainingOptions(steps=5))
    trainer.train_step(micro_loss(model))
    before = snapshot(trainer)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.train_step(lambda step, micro: torch.tensor(float("nan")))
    after = snapshot(trainer)
    assert trainer.step == 1 and all(torch.equal(before[k], after[k]) for k in before)


def test_grad_accumulation_matches_big_batch():
    """Two micro-batches of 4 with accumulation equal one batch of 8 (same samples)."""
    cfg = dict(steps=1, learning_rate=1e-2, grad_clip=0.0)

    def loss_of(model, rows):
        return lambda step, micro: (model(DATA[rows[micro]]) - TARGET[rows[micro]]).pow(2).mean()

    m1, a1 = make("tlora")
    t1 = Trainer(a1, TrainingOptions(grad_accumulation=2, **cfg))
    t1.train_step(loss_of(m1, [torch.arange(4), torch.arange(4, 8)]))
    m2, a2 = make("tlora")
    t2 = Trainer(a2, TrainingOptions(**cfg))
    t2.train_step(loss_of(m2, [torch.arange(8)]))
    s1, s2 = snapshot(t1), snapshot(t2)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], atol=1e-6, rtol=1e-5)


def test_schedule():
    cfg = TrainingOptions(steps=10, warmup_steps=2, schedule="cosine")
    assert cfg.lr_factor(0) == 0.5 and cfg.lr_factor(1) == 1.0
    assert cfg.lr_factor(2) == pytest.approx(1.0) and cfg.lr_factor(9) < 0.05
    assert TrainingOptions(steps=10).lr_factor(7) == 1.0


def test_dco_loss():
    e = torch.tensor([0.3, 0.5])
    assert dco_loss(e, e, 1000.0).item() == pytest.approx(math.log(2))
    assert dco_loss(e - 0.01, e, 1000.0) < dco_loss(e + 0.01, e, 1000.0)


def test_resume_from_another_method_is_refused(tmp_path):
    model, adapters = make("soda")
    trainer = Trainer(adapters, TrainingOptions(steps=2))
    trainer.train_step(micro_loss(model))
    trainer.save_state(tmp_path / "s.safetensors")
    _, other = make("tlora")
    with pytest.raises(ValueError, match=r"another method|does not fit"):
        Trainer(other, TrainingOptions(steps=2)).load_state(tmp_path / "s.safetensors")


def test_trainer_adds_the_active_regularizers_only():
    regularized = TLoRA((24, 24), preset("tlora", regularizer="identity", regularizer_weight=0.5))
    plain = TLoRA((24, 24), PRESETS["tlora"])
    trainer = Trainer({"a": regularized, "b": plain}, TrainingOptions(steps=1))
    assert regularized.has_regularizer and not plain.has_regularizer
    assert trainer.regularizer().item() == 0.0  # at the init the anchored regularizer is zero
    with torch.no_grad():
        regularized.transform[0].add_(0.1)
        plain.transform[0].add_(0.1)
    torch.testing.assert_close(trainer.regularizer(), regularized.regularizer())
    assert trainer.regularizer().item() > 0.0
