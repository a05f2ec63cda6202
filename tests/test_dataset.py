"""Image folders for the headless trainer and Load Training Images: pairing captions and the errors
users meet, each named (unreadable images, captions that are not UTF-8)."""

import pytest

from tlora.dataset import check_folder, check_same_size, image_caption_pairs, load_images


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
