"""The quality benchmark's data pipeline, model wiring and metric code (bench/quality/), on
small synthetic arrays plus scikit-learn's bundled digits. Seconds, no training runs."""

import numpy as np
import pytest
import torch

from bench.quality.adapt import Spec, count_parameters
from bench.quality.approx import LAYER_TYPES, layer_type
from bench.quality.data import split_digits, to_model_range, to_pixels
from bench.quality.metrics import (
    DigitJudge,
    denoising_loss,
    energy_rank,
    make_eval_set,
    mean_std,
    relative_error,
)
from bench.quality.report import (
    MARK_END,
    MARK_START,
    at_budget,
    compare,
    lora_curve_errors,
    lora_reference,
    write_results_md,
)
from bench.quality.unet import ALPHAS_CUMPROD, NUM_STEPS, UNet, noised, random_batch
from tlora.model import select_modules


def synthetic(per_class=30, classes=4, size=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    images = rng.integers(0, 17, size=(len(labels), size, size)).astype(np.float32)
    return images, labels


# -- data ----------------------------------------------------------------------------------
def test_model_range_maps_0_16_to_minus1_1_and_back():
    images = np.array([[[0, 8], [16, 4]]], dtype=np.float32)
    x = to_model_range(images)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.tensor([[-1.0, 0.0], [1.0, -0.5]]))
    assert np.array_equal(to_pixels(x), np.array([[[0, 128], [255, 64]]], dtype=np.uint8))


@pytest.mark.parametrize("bad", [np.zeros((2, 8)), np.full((1, 8, 8), 17.0), np.full((1, 8, 8), -1.0)])
def test_model_range_rejects_bad_arrays(bad):
    with pytest.raises(ValueError):
        to_model_range(bad)


def test_split_parts_are_disjoint_sized_and_stratified():
    images, labels = synthetic()
    split = split_digits(images, labels, new_class=2, shots=5, val_count=10, old_test_fraction=0.2, seed=0)
    assert len(split.new_train[0]) == 5 and len(split.new_val[0]) == 10 and len(split.new_test[0]) == 15
    for part in (split.new_train, split.new_val, split.new_test):
        assert set(part[1].tolist()) == {2}
    for part in (split.old_train, split.old_test):
        assert set(part[1].tolist()) == {0, 1, 3}  # every old class on both sides
    assert len(split.old_test[0]) == 3 * 6 and len(split.old_train[0]) == 3 * 24
    # no image in two parts (the synthetic images are distinct)
    parts = [split.old_train, split.old_test, split.new_train, split.new_val, split.new_test]
    rows = [tuple(img.flatten().tolist()) for x, _ in parts for img in x]
    assert len(rows) == len(set(rows)) == len(images)


def test_split_is_deterministic_in_its_seed():
    images, labels = synthetic()
    a, b = (split_digits(images, labels, 2, shots=5, val_count=10, seed=1) for _ in range(2))
    c = split_digits(images, labels, 2, shots=5, val_count=10, seed=2)
    assert torch.equal(a.new_train[0], b.new_train[0]) and torch.equal(a.old_test[0], b.old_test[0])
    assert not torch.equal(a.new_train[0], c.new_train[0])


def test_split_refuses_a_class_too_small():
    images, labels = synthetic(per_class=10)
    with pytest.raises(ValueError, match="too few"):
        split_digits(images, labels, 1, shots=5, val_count=5)
    with pytest.raises(ValueError, match="labels"):
        split_digits(images, labels[:-1], 1, shots=2, val_count=2)


def test_sklearn_digits_pipeline():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -r tests/requirements.txt)")
    from bench.quality.data import load_digits_arrays

    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16 and set(labels.tolist()) == set(range(10))
    split = split_digits(images, labels, 9, shots=10, val_count=40, seed=0)
    assert len(split.new_train[0]) == 10 and len(split.new_val[0]) == 40
    assert len(split.new_test[0]) == (labels == 9).sum() - 50
    assert split.old_train[0].shape[1:] == (1, 8, 8)
    assert split.old_train[0].min() >= -1 and split.old_train[0].max() <= 1


# -- the model and the diffusion -----------------------------------------------------------
def test_unet_layers_are_named_like_comfyui():
    model = UNet()
    attention = select_modules(model)
    assert len(attention) == 40  # 5 transformer blocks × (attn1, attn2) × (q, k, v, out)
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0" in attention
    assert {layer_type(n) for n in attention} == set(LAYER_TYPES)
    assert len(select_modules(model, ["feed_forward"])) == 10 and len(select_modules(model, ["proj"])) == 10
    lora1 = sum(sum(m.weight.shape) for m in attention.values())  # r·(out + in) at r = 1
    assert count_parameters(model, Spec("lora", residual_rank=1)) == lora1
    out = model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999]), torch.tensor([3, model.empty_label]))
    assert out.shape == (2, 1, 8, 8)


def test_noise_schedule_and_noising():
    assert ALPHAS_CUMPROD.shape == (NUM_STEPS,)
    assert (ALPHAS_CUMPROD.diff() <= 0).all() and 0 < ALPHAS_CUMPROD[-1] < 1e-4 < 0.999 < ALPHAS_CUMPROD[0] < 1
    x0, noise, t = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0), torch.tensor([500])
    a = ALPHAS_CUMPROD[500]
    assert torch.allclose(noised(x0, t, noise), (a.sqrt() + 2 * (1 - a).sqrt()).expand(1, 1, 2, 2))


def test_random_batch_draws_from_its_generator_and_drops_labels():
    images, labels = torch.randn(6, 1, 8, 8), torch.arange(6)
    a = random_batch(images, labels, 4, torch.Generator().manual_seed(0))
    b = random_batch(images, labels, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert ((a[2] >= 0) & (a[2] < NUM_STEPS)).all()
    dropped = random_batch(images, labels, 5, torch.Generator().manual_seed(0), empty_label=10, drop=1.0)
    assert dropped[1].tolist() == [10] * 5


# -- metrics -------------------------------------------------------------------------------
def test_eval_set_is_stratified_and_fixed():
    images, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    data = make_eval_set(images, labels, timesteps_per_image=4, seed=5)
    assert len(data) == 12 and data.labels.tolist() == [1] * 4 + [2] * 4 + [3] * 4
    bins = (data.t * 4 // NUM_STEPS).reshape(3, 4)
    assert (bins == torch.arange(4)).all()  # one timestep in each quarter of the schedule, per image
    again = make_eval_set(images, labels, timesteps_per_image=4, seed=5)
    assert torch.equal(data.t, again.t) and torch.equal(data.noise, again.noise)


class PredictsZero(torch.nn.Module):
    def forward(self, x, t, labels):
        return torch.zeros_like(x)


def test_denoising_loss_is_the_mean_error_whatever_the_batching():
    data = make_eval_set(torch.randn(5, 1, 8, 8), torch.zeros(5, dtype=torch.long), 3, seed=0)
    expected = data.noise.pow(2).mean().item()
    assert denoising_loss(PredictsZero(), data) == pytest.approx(expected, rel=1e-6)
    assert denoising_loss(PredictsZero(), data, batch_size=4) == pytest.approx(expected, rel=1e-6)


def test_relative_error_and_energy_rank():
    base, target = torch.zeros(4, 4), torch.eye(4)
    assert relative_error(target, target, base) == 0
    assert relative_error(base, target, base) == pytest.approx(1.0)
    assert relative_error(0.5 * target, target, base) == pytest.approx(0.5)
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))  # energies 9, 4, 1 of 14
    assert energy_rank(delta, 0.9) == 2 and energy_rank(delta, 0.5) == 1 and energy_rank(delta, 0.99) == 3


def test_mean_std_and_compare():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert compare([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]) == "better"
    assert compare([2.0, 2.1, 1.9], [1.0, 1.1, 0.9]) == "worse"
    assert compare([1.0, 1.5, 0.5], [1.1, 1.6, 0.6]) == "tie"


def test_budgets_pick_the_largest_size_within_the_cap():
    rows = [
        {"method": "lora", "label": "r1", "ratio": 1.0},
        {"method": "lora", "label": "r4", "ratio": 4.0},
        {"method": "tlora", "label": "t", "ratio": 0.65},
    ]
    assert at_budget(rows, "lora", 3.9)["label"] == "r1" and at_budget(rows, "lora", 4.0)["label"] == "r4"
    assert at_budget(rows, "tlora", 0.5) is None
    assert lora_reference(rows, 0.75)["label"] == "r1"  # below LoRA r=1, r=1 itself


def test_lora_curve_is_interpolated_in_log_parameters():
    flat = [
        {"method": "lora", "ratio": 1.0, "errors": [0.8, 0.6]},
        {"method": "lora", "ratio": 4.0, "errors": [0.4, 0.2]},
        {"method": "tlora", "ratio": 2.0, "errors": [0.0, 0.0]},
    ]
    assert lora_curve_errors(flat, 2.0) == pytest.approx([0.6, 0.4])  # log 2 is halfway from log 1 to log 4
    assert lora_curve_errors(flat, 0.5) == [0.8, 0.6]  # below r=1: r=1's error
    assert lora_curve_errors(flat, 9.0) == [0.4, 0.2]


def test_judge_learns_separable_classes():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(20)
    images = torch.randn(60, 1, 8, 8, generator=gen) * 0.1
    images[:, 0, 0, 2:6] += (labels[:, None] == 0).float()
    images[:, 0, 4, 2:6] += (labels[:, None] == 1).float()
    images[:, 0, 2:6, 4] += (labels[:, None] == 2).float()
    judge = DigitJudge(num_classes=3).fit(images, labels, steps=100)
    assert judge.accuracy(images, labels) > 0.95


def test_results_md_keeps_the_hand_written_text(tmp_path, monkeypatch):
    import bench.quality.report as report

    monkeypatch.setattr(report, "generated_section", lambda results: f"{MARK_START}\nnew {results}\n{MARK_END}")
    path = tmp_path / "RESULTS.md"
    write_results_md(path, 1)
    assert path.read_text() == f"{MARK_START}\nnew 1\n{MARK_END}\n"
    path.write_text(f"# intro\n\n{MARK_START}\nold\n{MARK_END}\n\n## discussion\n")
    write_results_md(path, 2)
    assert path.read_text() == f"# intro\n\n{MARK_START}\nnew 2\n{MARK_END}\n\n## discussion\n"
