"""A training loss history drawn as a picture with PIL (the TLoRA Loss Plot node's drawing).

Raw losses as light points, their exponential moving average as a dark line, a log axis when the
losses span more than a factor of 50 (``auto``). Never fails on the history it gets: NaN/inf steps
are left out of the curves and marked in red on the x axis; an empty history draws "no data".
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LOG_SCALES = ["auto", "on", "off"]
LOG_AUTO_RATIO = 50.0
BACKGROUND, AXIS, RAW, SMOOTH, BAD, TEXT = "white", (90, 90, 90), (170, 200, 235), (20, 60, 140), (210, 40, 40), "black"


def ema(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average, bias-corrected (the first points are not pulled towards 0)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = smoothing * avg + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(avg / weight)
    return out


def use_log(values: list[float], log_scale: str) -> bool:
    if log_scale == "on":
        return bool(values) and min(values) > 0
    if log_scale == "off" or not values or min(values) <= 0:
        return False
    return max(values) / min(values) > LOG_AUTO_RATIO


def losses_of(loss_map) -> list:
    """The loss list of a LOSS_MAP (``{"loss": [...]}``), tolerating None, a bare list or junk entries."""
    values = loss_map.get("loss", []) if isinstance(loss_map, dict) else loss_map
    out = []
    for v in values or []:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def draw_loss(losses: list[float], smoothing: float, log_scale: str, width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, 12, 24, 22
    x0, x1, y0, y1 = left, max(left + 1, width - right), top, max(top + 1, height - bottom)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXIS)
    good = [(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if not good:
        title = "loss: no data" if not losses else f"loss: no finite values in {len(losses)} steps"
        draw.text((x0 + 4, 4), title, fill=TEXT, font=font)
        draw.text(((x0 + x1) // 2 - 20, (y0 + y1) // 2), "no data", fill=AXIS, font=font)
        mark_bad(draw, bad, len(losses), x0, x1, y1)
        return image
    steps, values = [i for i, _ in good], [v for _, v in good]
    log = use_log(values, log_scale)
    f = math.log10 if log else (lambda v: v)
    lo, hi = f(min(values)), f(max(values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(losses) - 1, 1)

    def point(step: int, value: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * step / n, y1 - (y1 - y0) * (f(value) - lo) / (hi - lo)

    for step, value in good:
        x, y = point(step, value)
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=RAW)
    smoothed = ema(values, smoothing)
    line = [point(s, v) for s, v in zip(steps, smoothed, strict=True)]
    if len(line) > 1:
        draw.line(line, fill=SMOOTH, width=2)
    else:
        x, y = line[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=SMOOTH)
    mark_bad(draw, bad, len(losses), x0, x1, y1)
    for frac in (0.0, 0.5, 1.0):
        label_value = lo + frac * (hi - lo)
        label = f"{10**label_value:.3g}" if log else f"{label_value:.3g}"
        y = y1 - (y1 - y0) * frac
        draw.line([(x0 - 3, y), (x0, y)], fill=AXIS)
        draw.text((2, y - 6), label, fill=TEXT, font=font)
    draw.text((x0, y1 + 4), "0", fill=TEXT, font=font)
    draw.text((x1 - 30, y1 + 4), str(len(losses) - 1), fill=TEXT, font=font)
    title = f"loss {values[-1]:.4g} at step {steps[-1] + 1} of {len(losses)}"
    title += f" (EMA {smoothed[-1]:.4g}{', log' if log else ''})"
    if bad:
        title += f", {len(bad)} non-finite"
    draw.text((x0 + 4, 4), title, fill=TEXT, font=font)
    return image


def mark_bad(draw, bad: list[int], total: int, x0: float, x1: float, y1: float) -> None:
    n = max(total - 1, 1)
    for step in bad:
        x = x0 + (x1 - x0) * step / n
        draw.line([(x, y1 - 6), (x, y1 + 3)], fill=BAD, width=2)


def image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
