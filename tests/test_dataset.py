"""Image folders for the headless trainer: pairing captions and the errors users meet."""

import pytest

from tlora.dataset import check_same_size, image_caption_pairs


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
