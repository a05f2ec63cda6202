"""Real layer shapes of Stable Diffusion UNets' attention blocks, for the bench scripts."""

from __future__ import annotations


def attention_linears(widths_and_counts: list[tuple[int, int]], context_dim: int) -> list[tuple[str, int, int]]:
    """``(name, out, in)`` for to_q/k/v/out of attn1 (self) and attn2 (cross) of every
    transformer block; ``widths_and_counts`` lists (block width, number of blocks)."""
    layers = []
    for width, count in widths_and_counts:
        for b in range(count):
            for attn, ctx in (("attn1", width), ("attn2", context_dim)):
                prefix = f"w{width}.{b}.{attn}"
                layers += [
                    (f"{prefix}.to_q", width, width),
                    (f"{prefix}.to_k", width, ctx),
                    (f"{prefix}.to_v", width, ctx),
                    (f"{prefix}.to_out.0", width, width),
                ]
    return layers


# SD1.5: 16 transformer blocks (down 2+2+2, mid 1, up 3+3+3), context 768 → 128 linears.
SD15 = attention_linears([(320, 5), (640, 5), (1280, 6)], context_dim=768)
# SDXL: 70 transformer blocks (640: 2·2 down + 2·3 up; 1280: 2·10 down + 10 mid + 3·10 up), context 2048 → 560.
SDXL = attention_linears([(640, 10), (1280, 60)], context_dim=2048)
MODELS = {"SD1.5": SD15, "SDXL": SDXL}
