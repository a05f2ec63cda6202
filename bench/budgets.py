"""Trainable parameters of each adapter over each family's default layer set (``attention``).

    python bench/budgets.py

The paper's budgets (METHOD.md) are printed beside the counts and checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import FAMILIES, MODELS

from tlora import SODA, SODAConfig, TLoRA, preset, soda_preset

ROWS = {
    "LoRA r=1": preset("lora", residual_rank=1),
    "LoRA r=4": preset("lora", residual_rank=4),
    "TLoRA(1,2)": preset("tlora", transform_rank=1, residual_rank=2),
    "TLoRA(2,4)": preset("tlora", transform_rank=2, residual_rank=4),
    "TLoRA(2,6)": preset("tlora", transform_rank=2, residual_rank=6),
    "TLoRA*(2,4)": preset("tlora_star", transform_rank=2, residual_rank=4),
    "transform(2)": preset("transform", transform_rank=2),
    "residual TR(6)": preset("residual", residual_rank=6),
    "SODA": soda_preset("soda"),
    "SVDiff": soda_preset("svdiff"),
}
PAPER = {  # (model, row): millions of parameters reported in the papers
    ("SD1.5", "LoRA r=4"): 0.797,
    ("SD1.5", "TLoRA*(2,4)"): 0.941,
    ("SD1.5", "TLoRA(2,6)"): 0.400,
    ("SDXL", "LoRA r=1"): 1.452,
    ("SDXL", "TLoRA(1,2)"): 0.397,
}


def count(layers, config) -> int:
    adapter = SODA if isinstance(config, SODAConfig) else TLoRA
    return sum(adapter((out, inp), config).num_parameters() for _, out, inp in layers)


def main() -> int:
    counts = {(model, row): count(layers, cfg) for model, layers in MODELS.items() for row, cfg in ROWS.items()}
    print(
        f"{'adapter':<16}" + "".join(f"{m + ' (' + str(len(layers)) + ' layers)':>24}" for m, layers in MODELS.items())
    )
    for row in ROWS:
        cells = []
        for model in MODELS:
            n = counts[model, row]
            paper = PAPER.get((model, row))
            cells.append(f"{n / 1e6:8.3f}M" + (f" (paper {paper:.3f}M)" if paper else " " * 19))
        print(f"{row:<16}" + "".join(f"{c:>24}" for c in cells))
    print()
    families = {(model, row): count(layers, cfg) for model, layers in FAMILIES.items() for row, cfg in ROWS.items()}
    print(f"{'adapter':<16}" + "".join(f"{m:>14}" for m in FAMILIES))
    print(f"{'(layers)':<16}" + "".join(f"{len(layers):>14}" for layers in FAMILIES.values()))
    for row in ROWS:
        print(f"{row:<16}" + "".join(f"{families[m, row] / 1e6:13.2f}M" for m in FAMILIES))
    bad = [(k, counts[k], v) for k, v in PAPER.items() if round(counts[k] / 1e6, 3) != v]
    for key, got, want in bad:
        print(f"MISMATCH {key}: {got / 1e6:.3f}M vs paper {want:.3f}M")
    print("all paper budgets reproduced" if not bad else f"{len(bad)} budgets differ from the paper")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
