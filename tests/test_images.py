"""Every picture reaches the model as 8-bit RGB; unreadable files are found before training."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hf_finetune.data.images import image_problem, to_rgb


def test_grey_palette_cmyk_one_bit_become_rgb():
    grey = Image.fromarray(np.full((4, 6), 100, np.uint8))
    assert to_rgb(grey).mode == "RGB" and to_rgb(grey).getpixel((0, 0)) == (100, 100, 100)
    palette = grey.convert("P")
    assert to_rgb(palette).getpixel((0, 0)) == (100, 100, 100)
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    assert to_rgb(cmyk).getpixel((1, 1)) == (255, 0, 0)
    one_bit = Image.new("1", (3, 3), 1)
    assert to_rgb(one_bit).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGB", (2, 2))).size == (2, 2)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # fully transparent black
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    value = to_rgb(half).getpixel((0, 0))[0]
    assert 120 <= value <= 135
    la = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped():
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = Image.frombytes("I;16", (3, 1), array.astype("<u2").tobytes())
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8
    assert list(rgb[0, :, 0]) == [0, 128, 255]  # a plain convert("RGB") would give [0, 255, 255]


def _png_bytes(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", "unreadable"),
        (b"this is not an image", "unreadable"),
        ("truncated-jpeg", "unreadable"),
        ("truncated-png", "unreadable"),
    ],
)
def test_bad_files_are_reported(tmp_path, payload, expected):
    if payload == "truncated-jpeg":
        payload = _jpeg_bytes()[:300]
    elif payload == "truncated-png":
        payload = _png_bytes((64, 64))[:60]
    path = tmp_path / "bad.jpg"
    path.write_bytes(payload)
    assert expected in image_problem(str(path))
    assert expected in image_problem({"bytes": payload, "path": None}) if payload else True


def test_good_files_and_missing_files(tmp_path):
    good = tmp_path / "ok.png"
    good.write_bytes(_png_bytes())
    assert image_problem(str(good)) is None
    assert image_problem({"bytes": _jpeg_bytes(), "path": "x.jpg"}) is None
    assert image_problem(str(tmp_path / "missing.png")) == "file not found"
    tiny = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(tiny)
    assert image_problem(str(tiny)) is None  # 1x1 is odd but readable; the resize handles it


def test_extreme_aspect_ratios_keep_the_middle():
    from hf_finetune.data.images import limit_aspect_ratio

    strip = np.zeros((10, 5000, 3), np.uint8)
    strip[:, 2460:2540] = 255  # the middle 80 columns
    kept = limit_aspect_ratio(Image.fromarray(strip))
    assert kept.size == (80, 10) and np.asarray(kept).min() == 255
    tall = Image.new("RGB", (3, 1000))
    assert limit_aspect_ratio(tall).size == (3, 24)
    photo = Image.new("RGB", (640, 480))
    assert limit_aspect_ratio(photo) is photo
