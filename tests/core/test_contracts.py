"""``CaptionExample.load_image`` (``vlmkit.core.contracts``), the one image loader: hostile files
are one ``DataError`` line naming the image, nothing is read without bound, and images come out
the way they look (upright, 16-bit greyscale scaled, not clipped).

The hostile files are made by hand (the ``hostile_png`` fixture): a PNG header claiming 400 million pixels is
65 bytes, so the bombs here cost nothing to make or to refuse.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

import vlmkit.core.contracts as contracts
from vlmkit.core.contracts import CaptionExample
from vlmkit.core.errors import DataError


def load(image, id="img") -> Image.Image:
    return CaptionExample(id=id, captions=[], image=image).load_image()


def error_of(image, id="img") -> str:
    with pytest.raises(DataError) as info:
        load(image, id)
    message = str(info.value)
    assert "\n" not in message and "BytesIO" not in message and " at 0x" not in message, message
    return message


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000)], ids=["over-2x-limit", "over-limit"])
def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, size, hostile_png, recwarn):
    path = tmp_path / "bomb.png"
    path.write_bytes(hostile_png(*size, rows=0))
    message = error_of(path, id="bomb.png")
    assert message.startswith("image 'bomb.png' (") and str(path) in message
    assert f"{size[0] * size[1]} pixels" in message and "decompression bomb" in message
    with pytest.raises(DataError, match="decompression bomb"):
        load(path.read_bytes())  # the same from bytes (a Hub dataset's images)


def test_a_png_that_passes_verify_but_cannot_be_decoded_is_an_error(tmp_path, hostile_png):
    path = tmp_path / "cut.png"
    path.write_bytes(hostile_png(64, 64, cut=0.5))
    with Image.open(path) as img:
        img.verify()  # what a structural check would have passed
    assert "truncated" in error_of(path)


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")  # reading it would never end
    for path in (fifo, zero, tmp_path):
        assert error_of(path).endswith("is not a regular file (a folder, pipe or device)")
    assert error_of(tmp_path / "nowhere.png").endswith(": file not found")


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    monkeypatch.setattr(contracts, "MAX_IMAGE_BYTES", 100)
    assert "larger than 0 MiB, the most vlmkit reads" in error_of(path)


def test_bytes_that_are_no_image_name_the_example_not_a_buffer():
    assert error_of(b"\x89PNG but not really", id="coco-7") == (
        "image 'coco-7' is not a readable image (unknown format or corrupt data)"
    )


def test_exif_orientation_is_applied():
    """A phone photo: pixels stored sideways, an EXIF tag saying how to turn them upright."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif, quality=95)
    upright = load(buffer.getvalue())
    assert upright.size == (20, 40)
    red, green, blue = upright.getpixel((10, 2))  # the red band is now at the top
    assert red > 200 and blue < 60


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(path)  # 46% grey
    with Image.open(path) as img:
        assert img.mode == "I;16"
    assert load(path).getpixel((3, 3)) == (117, 117, 117)  # 30000 / 257, not white


def test_a_draft_decode_still_finds_a_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.effect_noise((256, 256), 60).convert("RGB").save(path, quality=90)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError, match="truncated"):
        CaptionExample(id="cut.jpg", captions=[], image=path).load_image(draft=True)
