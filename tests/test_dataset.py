"""Image folders for the headless trainer and Load Training Images: pairing captions and the errors
users meet, each named (unreadable images, captions that are not UTF-8)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tlora.dataset import (
    bucket_for,
    bucket_sizes,
    bucket_table,
    check_folder,
    check_same_size,
    draw_batch,
    group_by_shape,
    image_caption_pairs,
    load_buckets,
    load_images,
)


def make(folder, names, captions):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not decoded here")
    for name, text in captions.items():
        (folder / name).write_text(text)
    return folder


def test_pairs_sorted_with_captions(tmp_path):
    folder = make(tmp_path / "d", ["b.png", "a.JPG", "notes.md"], {"a.txt": " a cat \n", "b.txt": "a dog"})
    pairs = image_caption_pairs(folder)
    assert [(p.image.name, p.caption) for p in pairs] == [("a.JPG", "a cat"), ("b.png", "a dog")]


def test_missing_captions_are_named(tmp_path):
    folder = make(tmp_path / "d", ["a.png", "b.png"], {"a.txt": "x"})
    with pytest.raises(ValueError, match=r"1 of 2 images .* b.png needs b.txt"):
        image_caption_pairs(folder)
    assert [p.caption for p in image_caption_pairs(folder, default_caption="sks")] == ["x", "sks"]


def test_no_images_and_no_folder(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        image_caption_pairs(make(tmp_path / "d", [], {"a.txt": "x"}))
    with pytest.raises(ValueError, match="does not exist"):
        image_caption_pairs(tmp_path / "nope")


def test_sizes():
    assert check_same_size({"a": (64, 48), "b": (64, 48)}) == (64, 48)
    with pytest.raises(ValueError, match=r"2 different sizes \(a 64×48, b 32×32"):
        check_same_size({"a": (64, 48), "b": (32, 32)})


def real_image(path, size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, (10, 20, 30)).save(path)


def test_an_unreadable_image_is_named(tmp_path):
    """A text file renamed .png was a raw PIL.UnidentifiedImageError (issue 17)."""
    folder = make(tmp_path / "d", [], {"a.txt": "x", "b.txt": "y"})
    real_image(folder / "a.png")
    (folder / "b.png").write_text("I am a caption, not an image")
    with pytest.raises(ValueError, match=r"b.png is not a readable image \(UnidentifiedImageError"):
        check_folder(folder)
    with pytest.raises(ValueError, match=r"b\.png is not a readable image"):
        load_images(folder, None, None)


def test_a_truncated_image_is_named_when_decoded(tmp_path):
    folder = make(tmp_path / "d", [], {"a.txt": "x"})
    real_image(folder / "a.png", (64, 64))
    (folder / "a.png").write_bytes((folder / "a.png").read_bytes()[:60])  # the header survives
    with pytest.raises(ValueError, match=r"a.png is not a readable image \((OSError|SyntaxError)"):
        load_images(folder, None, None)


def test_a_caption_that_is_not_utf8_is_named(tmp_path):
    """A Latin-1 caption was a raw UnicodeDecodeError (issue 17)."""
    folder = make(tmp_path / "d", ["a.png"], {})
    (folder / "a.txt").write_bytes("un café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"caption a.txt is not UTF-8 text \(byte 6 is 0xe9\): save it as UTF-8"):
        image_caption_pairs(folder)


def test_a_utf8_caption_with_a_bom_reads_as_its_text(tmp_path):
    folder = make(tmp_path / "d", ["a.png"], {})
    (folder / "a.txt").write_bytes("\ufeffun café".encode())
    assert image_caption_pairs(folder)[0].caption == "un café"


# -- aspect-ratio buckets ------------------------------------------------------------------------


def test_bucket_sizes_fill_the_budget_in_multiples_of_the_step():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
        assert (h + 64) * w > 512 * 512  # the tallest that fits at this width
        assert 1 / 4 <= w / h <= 4
    assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)
    with pytest.raises(ValueError, match="at least the step"):
        bucket_sizes(32, 64)


def test_each_image_goes_to_the_closest_aspect_ratio():
    sizes = bucket_sizes(512, 64)
    assert bucket_for((1000, 1000), sizes) == (512, 512)
    assert bucket_for((1500, 900), sizes) == (640, 384)  # 5:3 exactly
    assert bucket_for((900, 1500), sizes) == (384, 640)
    for size in [(3000, 2000), (640, 480), (1080, 1920), (4000, 300)]:
        w, h = bucket_for(size, sizes)
        best = min(abs(math.log(a / b) - math.log(size[0] / size[1])) for a, b in sizes)
        assert abs(math.log(w / h) - math.log(size[0] / size[1])) == pytest.approx(best)


def framed(width: int, height: int, fill: int) -> Image.Image:
    """A flat image with a 2-pixel white frame: any crop removes white from an edge."""
    pixels = np.full((height, width, 3), fill, dtype=np.uint8)
    pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:] = 255, 255, 255, 255
    return Image.fromarray(pixels)


def test_load_buckets_keeps_whole_images_and_their_captions(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    shapes = {"a_square": (120, 120), "b_wide": (150, 90), "c_tall": (90, 150), "d_wide": (300, 180)}
    for i, (name, size) in enumerate(shapes.items()):
        framed(*size, fill=20 * i).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} photo")
    buckets = load_buckets(folder, 128, 32, None)
    assert [(b.size, b.names) for b in buckets] == [
        ((96, 160), ["c_tall.png"]),
        ((128, 128), ["a_square.png"]),
        ((160, 96), ["b_wide.png", "d_wide.png"]),
    ]
    for bucket in buckets:
        w, h = bucket.size
        assert bucket.pixels.shape == (len(bucket.names), h, w, 3)
        assert bucket.captions == [f"a {n[:-4]} photo" for n in bucket.names]
        for image in bucket.pixels:  # every edge still white: scaled whole, nothing cropped
            for edge in (image[0], image[-1], image[:, 0], image[:, -1]):
                assert edge.mean() > 0.6
    table = bucket_table([b.size for b in buckets], [len(b.names) for b in buckets])
    assert table.splitlines() == ["3 buckets, 4 images:", "  96×160: 1", "  128×128: 1", "  160×96: 2"]


def test_group_by_shape_keeps_each_sample_with_its_place():
    square = torch.arange(3 * 4 * 8 * 8.0).reshape(3, 4, 8, 8)
    wide = torch.arange(2 * 4 * 6 * 10.0).reshape(2, 4, 6, 10)
    more_square = torch.ones(1, 4, 8, 8)
    buckets, order = group_by_shape([square, wide, more_square])
    assert [tuple(b.shape) for b in buckets] == [(4, 4, 8, 8), (2, 4, 6, 10)]
    assert order == [0, 1, 2, 5, 3, 4]
    flat = [*square, *wide, *more_square]
    assert all(torch.equal(row, flat[i]) for row, i in zip([*buckets[0], *buckets[1]], order, strict=True))
    one, order = group_by_shape([square])
    assert one[0] is square and order == [0, 1, 2]


def test_video_latents_bucket_by_frames_too():
    clips = [torch.zeros(1, 16, t, 8, 8) for t in (5, 9, 5)]
    buckets, order = group_by_shape(clips)
    assert [tuple(b.shape) for b in buckets] == [(2, 16, 5, 8, 8), (1, 16, 9, 8, 8)] and order == [0, 2, 1]


def test_draw_batch_takes_one_bucket_and_every_image_alike():
    gen = torch.Generator().manual_seed(0)
    assert draw_batch([7], 3, torch.Generator().manual_seed(5)) == (
        0,
        torch.randperm(7, generator=torch.Generator().manual_seed(5))[:3].tolist(),
    )
    sizes = [1, 3, 6]
    seen = {b: set() for b in range(3)}
    picks = [0, 0, 0]
    for _ in range(3000):
        bucket, rows = draw_batch(sizes, 2, gen)
        assert len(rows) == min(2, sizes[bucket]) and len(set(rows)) == len(rows) and max(rows) < sizes[bucket]
        seen[bucket].update(rows)
        picks[bucket] += 1
    assert all(len(seen[b]) == sizes[b] for b in seen)
    for b, size in enumerate(sizes):  # a bucket is drawn as often as its share of the images
        assert picks[b] / 3000 == pytest.approx(size / 10, abs=0.03)
