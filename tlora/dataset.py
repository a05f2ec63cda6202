"""A training folder: images with a caption ``.txt`` beside each (``cat.png`` + ``cat.txt``),
read into a pixel batch and one caption line per image (Load Training Images and the command
line both use :func:`load_images`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

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
        Example(p, read_caption(p.with_suffix(".txt")) if p.with_suffix(".txt").is_file() else default_caption)
        for p in images
    ]


def read_caption(path: Path) -> str:
    """A caption file's text (UTF-8, a BOM allowed), stripped; a ValueError naming the file and
    the first bad byte otherwise."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"caption {path.name} is not UTF-8 text (byte {err.start} is {path.read_bytes()[err.start]:#04x}): "
            "save it as UTF-8"
        ) from None


def open_image(path: Path, load: bool = True) -> Image.Image | None:
    """An image file, EXIF-rotated and RGB (``load``), or only its header read; a ValueError
    naming the file when it is not a readable image (a text file renamed .png, truncated, …)."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB") if load else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path.name} is not a readable image ({type(err).__name__}: {err})") from None


def check_folder(folder: str | Path, default_caption: str | None = None) -> list[Example]:
    """What :func:`load_images` checks before decoding anything: the folder's images and
    captions pair up, every caption reads as UTF-8 and every image file's header is an image's."""
    pairs = image_caption_pairs(folder, default_caption)
    for pair in pairs:
        open_image(pair.image, load=False)
    return pairs


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


def load_images(folder: str | Path, size: tuple[int, int] | None, default_caption: str | None):
    """``(pixels [B, H, W, 3] in 0..1, captions)``; all images one size, or center-cropped and
    resized to ``size``. Each caption is one line (its whitespace runs become single spaces)."""
    pairs = check_folder(folder, default_caption)
    images = [open_image(p.image) for p in pairs]
    if size is None:
        check_same_size({p.image.name: im.size for p, im in zip(pairs, images, strict=True)})
    else:
        images = [ImageOps.fit(im, size, Image.Resampling.LANCZOS) for im in images]
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))
    return pixels, [" ".join(p.caption.split()) for p in pairs]


def per_image(items: list, count: int, what: str) -> list:
    """``items`` as one per image: a single item is shared by all ``count`` images."""
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise ValueError(f"{len(items)} {what} for {count} images: give one for all images, or one per image")
    return list(items)
