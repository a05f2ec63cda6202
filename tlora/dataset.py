"""A training folder: images with a caption ``.txt`` beside each (``cat.png`` + ``cat.txt``).

Only file names and text here (no image decoding), so the rules are testable anywhere; the
host glue (nodes/headless.py) reads the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def image_caption_pairs(folder: str | Path, default_caption: str | None = None) -> list[Example]:
    """Every image of ``folder`` (sorted by name) with its caption. Raises ValueError naming
    the problem: a missing folder, no images, or images without a caption file (unless a
    ``default_caption`` is given for those)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing and default_caption is None:
        raise ValueError(
            f"{len(missing)} of {len(images)} images in {folder} have no caption file (e.g. {missing[0]} needs "
            f"{Path(missing[0]).with_suffix('.txt').name}); add them or give a default caption"
        )
    return [
        Example(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else default_caption)
        for p in images
    ]


def check_same_size(sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """The common ``(width, height)`` of named images, or a ValueError listing the sizes
    (training batches need one size: resize or crop them, or pass a target size)."""
    distinct = sorted(set(sizes.values()))
    if len(distinct) > 1:
        examples = ", ".join(f"{name} {w}×{h}" for name, (w, h) in list(sizes.items())[:4])
        raise ValueError(
            f"the images have {len(distinct)} different sizes ({examples}, …): resize them to one size, "
            "or give a target size (--size WxH) to center-crop and resize them"
        )
    return distinct[0]
