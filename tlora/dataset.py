"""A training folder: images with a caption ``.txt`` beside each (``cat.png`` + ``cat.txt``),
read into a pixel batch and one caption line per image (Load Training Images and the command
line both use :func:`load_images`), or into aspect-ratio buckets (:func:`load_buckets`).

Buckets: every image goes to the bucket whose aspect ratio is closest to its own among the sizes
of about one pixel budget (:func:`bucket_sizes`), is scaled to cover it and center-cropped by
less than one ``step``. Training draws each batch from one bucket (:func:`draw_batch`); latents
of several sizes, video latents too (frames are part of the shape), are grouped by shape
(:func:`group_by_shape`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

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
    return to_pixels(images), [one_line(p.caption) for p in pairs]


def to_pixels(images: Sequence[Image.Image]) -> Tensor:
    """``[B, H, W, 3]`` in 0..1 (ComfyUI's IMAGE) from same-sized images."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))


def one_line(caption: str) -> str:
    return " ".join(caption.split())


# -- aspect-ratio buckets ------------------------------------------------------------------------


MAX_ASPECT = 4.0  # no bucket is longer than 4:1


def bucket_sizes(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """The bucket sizes ``(width, height)`` of a pixel budget of ``resolution²``: for each width a
    multiple of ``step``, the largest height (a multiple of ``step``) within the budget; aspect
    ratios up to :data:`MAX_ASPECT` either way. Sorted by aspect ratio (width / height)."""
    if step <= 0 or resolution < step:
        raise ValueError(f"bucket resolution {resolution} must be at least the step {step} (and the step positive)")
    budget = resolution * resolution
    sizes = set()
    for width in range(step, budget // step + 1, step):
        height = budget // width // step * step
        if height >= step and 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            sizes.add((width, height))
    return sorted(sizes, key=lambda s: s[0] / s[1])


def bucket_for(size: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of an image of ``size`` ``(width, height)``: the closest aspect ratio (in log
    scale: 2:1 and 1:2 are as far from 1:1), the larger area on a tie."""
    aspect = math.log(size[0] / size[1])
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 9), -s[0] * s[1]))


@dataclass
class Bucket:
    """Images of one size ``(width, height)``: ``pixels`` ``[B, H, W, 3]``, one caption and file name each."""

    size: tuple[int, int]
    pixels: Tensor
    captions: list[str]
    names: list[str]


def load_buckets(folder: str | Path, resolution: int, step: int, default_caption: str | None) -> list[Bucket]:
    """The folder's images in aspect-ratio buckets (sorted by size; images in name order inside),
    each scaled to cover its bucket and center-cropped by less than one ``step``."""
    pairs = check_folder(folder, default_caption)
    sizes = bucket_sizes(resolution, step)
    grouped: dict[tuple[int, int], list[tuple[Example, Image.Image]]] = {}
    for pair in pairs:
        image = open_image(pair.image)
        grouped.setdefault(bucket_for(image.size, sizes), []).append((pair, image))
    return [
        Bucket(
            size,
            to_pixels([ImageOps.fit(im, size, Image.Resampling.LANCZOS) for _, im in members]),
            [one_line(p.caption) for p, _ in members],
            [p.image.name for p, _ in members],
        )
        for size, members in sorted(grouped.items())
    ]


def bucket_table(shapes: Sequence[tuple[int, ...]], counts: Sequence[int], what: str = "images") -> str:
    """One line per bucket: its shape and how many it holds."""
    total = sum(counts)
    lines = [f"{len(shapes)} bucket{'s' if len(shapes) != 1 else ''}, {total} {what}:"]
    lines += [f"  {'×'.join(map(str, shape))}: {n}" for shape, n in zip(shapes, counts, strict=True)]
    return "\n".join(lines)


def group_by_shape(batches: Sequence[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Latent batches (``[B_i, C, …]``, sizes and frame counts free) regrouped into one tensor per
    sample shape, in order of first appearance, and ``order``: for each row of the buckets laid end
    to end, its index in the batches laid end to end (what captions follow). One shape: the
    batches as they are."""
    if len({tuple(b.shape[1:]) for b in batches}) == 1:
        return [batches[0] if len(batches) == 1 else torch.cat(list(batches))], list(
            range(sum(len(b) for b in batches))
        )
    rows: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
    index = 0
    for batch in batches:
        for sample in batch:
            rows.setdefault(tuple(sample.shape), []).append((index, sample))
            index += 1
    buckets = [torch.stack([t for _, t in members]) for members in rows.values()]
    return buckets, [i for members in rows.values() for i, _ in members]


def draw_batch(sizes: Sequence[int], batch_size: int, generator: torch.Generator) -> tuple[int, list[int]]:
    """A micro-batch from one bucket: ``(bucket, rows of it)``. The bucket is that of an image
    drawn uniformly (so every image is as likely), then up to ``batch_size`` distinct rows of it.
    One bucket: ``batch_size`` distinct rows of all."""
    bucket = 0
    if len(sizes) > 1:
        drawn = int(torch.randint(sum(sizes), (1,), generator=generator))
        bucket = bisect.bisect_right(list(accumulate(sizes)), drawn)
    return bucket, torch.randperm(sizes[bucket], generator=generator)[:batch_size].tolist()


def per_image(items: list, count: int, what: str) -> list:
    """``items`` as one per image: a single item is shared by all ``count`` images."""
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise ValueError(f"{len(items)} {what} for {count} images: give one for all images, or one per image")
    return list(items)
