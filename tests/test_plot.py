"""The loss plot's drawing: what a person should see for each kind of history."""

import math

import numpy as np
import pytest

from tlora.plot import BAD, RAW, SMOOTH, draw_loss, ema, losses_of, use_log

W, H = 320, 160


def pixels_of(image, color) -> np.ndarray:
    """(x, y) of every pixel of exactly ``color``."""
    rgb = np.asarray(image)
    ys, xs = np.nonzero((rgb == np.array(color, dtype=np.uint8)).all(axis=-1))
    return np.stack([xs, ys], axis=1)


def bad_mark_columns(image) -> set[int]:
    return {int(x) for x, _ in pixels_of(image, BAD)}


def draw(losses, log_scale="auto"):
    return draw_loss(losses_of({"loss": losses}), 0.9, log_scale, W, H)


def test_a_falling_loss_draws_points_and_a_falling_curve():
    image = draw([1.0 / (1 + i) for i in range(50)])
    curve = pixels_of(image, SMOOTH)
    assert len(pixels_of(image, RAW)) > 50 and len(curve) > 100
    left, right = curve[curve[:, 0] < 100], curve[curve[:, 0] > 250]
    assert left[:, 1].mean() < right[:, 1].mean()  # y grows downwards: the curve falls
    assert not bad_mark_columns(image)


def test_non_finite_steps_are_marked_and_left_out():
    losses = [0.5, math.nan, 0.4, math.inf, 0.3, None]
    image = draw(losses)
    columns = bad_mark_columns(image)
    assert columns and len({c // 10 for c in columns}) == 3  # three marks, at distinct steps
    assert len(pixels_of(image, SMOOTH)) > 0  # the finite steps still make a curve


def test_all_non_finite_and_empty_draw_no_curve():
    for losses, marks in (([math.nan] * 3, True), ([], False)):
        image = draw(losses)
        assert len(pixels_of(image, SMOOTH)) == 0 and len(pixels_of(image, RAW)) == 0
        assert bool(bad_mark_columns(image)) == marks


def test_log_axis_spreads_small_losses():
    losses = [100.0, 1.0, 0.5, 0.01]
    assert use_log(losses, "auto") and not use_log(losses, "off") and not use_log([1.0, 2.0], "auto")
    assert not use_log([0.0, 1.0], "on")  # no log of 0
    heights = {}
    for scale in ("on", "off"):
        points = pixels_of(draw(losses, scale), RAW)
        heights[scale] = np.ptp(points[points[:, 0] > W // 3][:, 1])  # steps 1..3: 1, 0.5, 0.01
    assert heights["on"] > 5 * heights["off"]


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([0.0, 1.0], 0.5)[1] == pytest.approx(2 / 3)
