"""Real layer shapes of each family's default layer set (``attention``: tlora/targets.py), for the bench scripts.

Shapes as ComfyUI builds the released models (docs/families.md; tests/host/test_families.py checks them)."""

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


def repeated(count: int, layers: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """``layers`` (``(name, out, in)``) of one block, for ``count`` blocks."""
    return [(f"{b}.{name}", out, inp) for b in range(count) for name, out, inp in layers]


# SD3.5 Large: 38 joint blocks, 2432 wide; both streams' fused qkv and proj (the last block has no context proj).
SD35 = repeated(38, [("x.qkv", 7296, 2432), ("x.proj", 2432, 2432), ("ctx.qkv", 7296, 2432)]) + repeated(
    37, [("ctx.proj", 2432, 2432)]
)
# Flux.1 [dev]: 19 double blocks (img/txt qkv and proj), 38 single blocks (linear1 fuses qkv + MLP in, linear2 out).
FLUX = repeated(
    19, [(f"{s}.{n}", o, i) for s in ("img", "txt") for n, o, i in (("qkv", 9216, 3072), ("proj", 3072, 3072))]
)
FLUX += repeated(38, [("linear1", 21504, 3072), ("linear2", 3072, 15360)])
# Qwen-Image: 60 blocks, q/k/v/out of both streams, 3072 wide.
QWEN_IMAGE = repeated(60, [(f"{n}", 3072, 3072) for n in ("q", "k", "v", "out", "add_q", "add_k", "add_v", "add_out")])
# Z-Image: 30 layers + 2 noise and 2 context refiners, fused qkv and out, 3840 wide.
ZIMAGE = repeated(34, [("qkv", 11520, 3840), ("out", 3840, 3840)])
# Wan 2.1 14B (and 2.2 A14B): 40 blocks, self- and cross-attention q/k/v/o, 5120 wide.
WAN14B = repeated(40, [(f"{a}.{n}", 5120, 5120) for a in ("self", "cross") for n in "qkvo"])

MODELS = {"SD1.5": SD15, "SDXL": SDXL}
FAMILIES = {"SD3.5 Large": SD35, "Flux.1": FLUX, "Qwen-Image": QWEN_IMAGE, "Z-Image": ZIMAGE, "Wan 2.1 14B": WAN14B}
