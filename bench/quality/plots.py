"""The benchmark's figures (matplotlib, Agg backend): loss and error against parameter count
with seed spread as error bars, and sample grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# One colour and marker per method, the same in every figure.
STYLE = {
    "LoRA": ("#1f77b4", "o"),
    "TLoRA": ("#d62728", "s"),
    "TLoRA*": ("#ff7f0e", "D"),
    "transform-only": ("#9467bd", "^"),
    "residual-only": ("#8c564b", "v"),
    "SODA": ("#2ca02c", "P"),
    "SVDiff": ("#17becf", "X"),
}

# A curve: x values, y means, y standard deviations.
Curve = tuple[Sequence[float], Sequence[float], Sequence[float]]


def _panel(ax, curves: Mapping[str, Curve], title: str, ylabel: str, references: Mapping[str, float]) -> None:
    for name, (xs, ys, errs) in curves.items():
        colour, marker = STYLE[name]
        order = np.argsort(xs)
        ax.errorbar(
            np.asarray(xs)[order],
            np.asarray(ys)[order],
            yerr=np.asarray(errs)[order],
            label=name,
            color=colour,
            marker=marker,
            markersize=5,
            capsize=3,
            linewidth=1.4,
        )
    for (label, value), style in zip(references.items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, color="0.4", linestyle=style, linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (× LoRA r=1)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def curves_figure(
    path: Path,
    panels: Sequence[tuple[str, str, Mapping[str, Curve], Mapping[str, float]]],
    suptitle: str,
) -> None:
    """One row of panels ``(title, y label, curves by method, reference lines)``; one legend."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9), squeeze=False)
    for ax, (title, ylabel, curves, references) in zip(axes[0], panels, strict=True):
        _panel(ax, curves, title, ylabel, references)
    handles, labels = {}, []
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 5 else 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def image_grid(path: Path, rows: Sequence[tuple[str, np.ndarray]], title: str) -> None:
    """Rows of uint8 images ``[n, H, W]``, each row labelled on the left."""
    columns = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(0.55 * columns + 1.6, 0.6 * len(rows) + 0.5), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    width, height = 0.55 * columns + 1.6, 0.6 * len(rows) + 0.5
    fig.subplots_adjust(left=1.5 / width, right=0.99, top=1 - 0.35 / height, bottom=0.02, wspace=0.05, hspace=0.1)
    fig.savefig(path, dpi=80)
    plt.close(fig)
