"""Image hygiene: every picture reaches the model upright, as 8-bit RGB and at no more pixels than it needs;
unreadable files are found up front."""

from __future__ import annotations

import functools
import io
import math
import os
from typing import Any, NamedTuple

# Decoding a 12-megapixel JPEG in full only to check that it is readable is wasted work: PIL's draft mode
# decodes JPEGs at a reduced scale, which still reads every entropy-coded block (so truncation shows).
_CHECK_DRAFT_SIZE = (64, 64)


def to_rgb(image):
    """Convert any PIL image (L, LA, P, PA, RGBA, CMYK, I;16, I, F, 1, ...) to 8-bit RGB.

    Transparent areas are composited onto white (a plain `convert("RGB")` shows whatever colour happens to be
    stored under the alpha channel, often black), and 16-bit images are scaled from their bit depth (/257) to
    0-255 instead of being clipped (which turns most 16-bit photographs white).
    """
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Scaled by the bit depth, never by the picture's own values: 65535 is white and 1000 a dark grey in
        # every 16-bit picture, whatever else it holds. `I` (32-bit) is what 16-bit PNG / TIFF files decode to
        # in some Pillow versions, so it is read as 16-bit too.
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.rint(array).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        # Floating-point pictures have no bit depth to go by: the 16-bit range when beyond 8 bits, else [0, max].
        array = np.asarray(image, dtype=np.float64)
        high = float(array.max(initial=0.0))
        array = np.clip(array, 0, None) / (65535.0 if high > 255 else max(high, 1.0)) * 255.0
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class UnusableImage(ValueError):
    """A picture that decodes but cannot be used, or a value with no picture in it; reported as its message."""


def open_image(value: Any):
    """Open a `datasets.Image(decode=False)` value ({"bytes", "path"}), a path or a PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return _open_bytes(value["bytes"], value.get("path"))
        value = value.get("path")
    if not value:
        raise UnusableImage("no image data")
    return Image.open(value)


def _open_bytes(data: bytes, path: str | None):
    """PIL's `Image.open` on bytes, naming the picture's file (not a BytesIO object) when PIL cannot tell the
    format, as it does when it opens the file itself: reports then name the picture, whichever was read."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if not path:
            raise
        raise UnidentifiedImageError(f"cannot identify image file {path!r}") from None


# EXIF orientations 5-8 store the picture turned by 90 degrees: width and height swap once it is upright.
_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)
# Phone cameras often write MPO files (a JPEG with extra frames); PIL decodes both with the same JPEG decoder.
_JPEG_FORMATS = ("JPEG", "MPO")


def is_jpeg(image) -> bool:
    return getattr(image, "format", None) in _JPEG_FORMATS


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block leaves the picture as stored rather than unreadable
        return 1


@functools.cache
def _upright_turns() -> dict:
    """EXIF orientation -> the transpose that makes the picture upright, as PIL's ImageOps.exif_transpose does
    it, but without rewriting the EXIF block (which raises on damaged EXIF data the picture does not need)."""
    from PIL import Image

    return {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }


def load_rgb(value: Any, draft_size: tuple[int, int] | None = None):
    """Open an image upright (EXIF orientation applied) as 8-bit RGB.

    Phone cameras store most photographs sideways with an EXIF orientation tag; `datasets`' own decoding and
    transformers' pipelines turn them upright, so training must too. With `draft_size` (width, height, of the
    upright picture), JPEGs are decoded in PIL's draft mode at the smallest power-of-two reduction that still
    covers it: a 12-megapixel photo bound for a 224-pixel model decodes at 1/4 or 1/8 scale, several times
    faster than a full decode followed by a downscale.
    """
    image = open_image(value)
    orientation = _orientation(image)
    if draft_size and is_jpeg(image) and image.mode in ("RGB", "L", "CMYK"):
        width, height = (draft_size[1], draft_size[0]) if orientation in _TURNED else draft_size
        # The smallest reduction is 1/2: a picture less than twice the size asked for decodes in full anyway,
        # and skipping `draft` then saves its own cost, which shows on small pictures.
        if image.size[0] >= 2 * width and image.size[1] >= 2 * height:
            image.draft(image.mode, (width, height))
    turn = _upright_turns().get(orientation)
    image = to_rgb(image)
    return image.transpose(turn) if turn is not None else image


# Beyond this aspect ratio (a 1x5000 strip, a panorama) a short-edge resize would blow up the long edge into
# hundreds of thousands of pixels; the middle of the long side is kept instead, before any resizing.
MAX_ASPECT_RATIO = 8.0


def aspect_limited_size(width: int, height: int, max_ratio: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """(width, height) that `limit_aspect_ratio` keeps of a picture of this size."""
    short, long = min(width, height), max(width, height)
    if long <= max_ratio * short:
        return width, height
    keep = max(1, int(max_ratio * short))
    return (keep, height) if width > height else (width, keep)


def limit_aspect_ratio(image, max_ratio: float = MAX_ASPECT_RATIO):
    width, height = image.size
    kept = aspect_limited_size(width, height, max_ratio)
    if kept == (width, height):
        return image
    left, top = (width - kept[0]) // 2, (height - kept[1]) // 2
    return image.crop((left, top, left + kept[0], top + kept[1]))


class DecodeSizes(NamedTuple):
    """What the transforms need from each picture: the (width, height) it must cover, for training and for eval
    (None: the whole picture, e.g. an eval transform that only crops), and whether that split's transform
    resizes to exactly that size, aspect ratio ignored (ViT-style processors) rather than by its short edge."""

    train: tuple[int, int] | None
    eval: tuple[int, int] | None
    interpolation: str = "bilinear"  # the checkpoint processor's resampling filter
    train_exact: bool = False
    eval_exact: bool = False
    train_augmented: bool = True  # False: training uses the eval transform, so it gets eval (lossless) copies

    def cover(self, split: str) -> tuple[int, int] | None:
        return self.train if split == "train" else self.eval

    def exact(self, split: str) -> bool:
        return self.train_exact if split == "train" else self.eval_exact

    def lossless(self, split: str) -> bool:
        return split != "train" or not self.train_augmented


# A stored copy pays off only when it saves a real share of the pixels; a picture within this factor (per side)
# of the size the transforms need is used as it is.
DOWNSCALE_MIN_FACTOR = 1.25
TRAIN_COPY_QUALITY = 95
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def downscaled_copy(
    value: Any,
    cover: tuple[int, int],
    interpolation: str = "bilinear",
    lossless: bool = True,
    exact: bool = False,
) -> Any:
    """`value` ({"bytes", "path"}) as a smaller, upright RGB picture that still covers `cover` (width, height).

    Returns the new {"bytes", "path"} (the original path is kept for reports; the bytes win when the image is
    opened), or `value` itself when the picture is already within DOWNSCALE_MIN_FACTOR of `cover` or the copy
    would take no fewer bytes than the original. The copy is resized to what the eval transform resizes to
    (`exact`: to `cover` itself; otherwise the short edge to `cover`, rounded like torchvision). Lossless
    copies (evaluation) are resized with the checkpoint's own filter and stored as uncompressed PPM: the eval
    transform's resize of them is the identity, so they give exactly the pixels the original gives. Lossy
    copies (training, whose augmentation changes pixels far more) are quality-95 JPEGs without chroma
    subsampling, resized with the cheaper bilinear filter: about one grey level from the original on
    average. Raises what PIL raises on a bad file.
    """
    source = open_image(value)
    source_pixels = source.size[0] * source.size[1]
    # Lossless (evaluation) copies decode in full: a reduced-size JPEG decode changes pixels by up to a fifth
    # of the range (measured on scikit-image's photos), which pipeline(), decoding in full, would not see.
    image = limit_aspect_ratio(load_rgb(source, None if lossless else cover))
    image.load()
    width, height = image.size
    if width < 1 or height < 1:
        raise UnusableImage("image has no pixels")
    size = _copy_size(width, height, cover, exact)
    # Judged against the file's full size, not the reduced-size decode: even a draft decode reads the whole file.
    if not _worth_copying(size, source_pixels):
        return value
    # Lossless (evaluation) copies use the checkpoint's own filter, so their pixels are exactly the originals';
    # training copies use PIL's antialiased bilinear filter, 40 % cheaper than bicubic, before a random crop
    # resamples them again with the checkpoint's filter.
    resample = _RESAMPLE.get(interpolation, 2) if lossless else _RESAMPLE["bilinear"]
    image = image.resize(size, resample=resample)
    buffer = io.BytesIO()
    if lossless:
        # Uncompressed: PNG's inflate would cost as much as the reduced-size decode of the original.
        image.save(buffer, format="PPM")
    else:
        image.save(buffer, format="JPEG", quality=TRAIN_COPY_QUALITY, subsampling=0)
    copy = buffer.getvalue()
    if len(copy) >= _stored_size(value):
        return value  # a copy no smaller than the file would cost disk for little
    return {"bytes": copy, "path": _path_of(value)}


def _copy_size(width: int, height: int, cover: tuple[int, int], exact: bool) -> tuple[int, int]:
    if exact:
        return tuple(cover)
    scale = max(cover[0] / width, cover[1] / height)
    return (max(cover[0], math.floor(width * scale + 1e-6)), max(cover[1], math.floor(height * scale + 1e-6)))


def _worth_copying(size: tuple[int, int], source_pixels: int) -> bool:
    return size[0] * size[1] * DOWNSCALE_MIN_FACTOR**2 < source_pixels


def may_downscale(value: Any, cover: tuple[int, int], exact: bool = False) -> bool:
    """Whether `downscaled_copy` would make a copy of `value` by its pixel count, read from the file's header
    alone (no decoding). False for anything unreadable: the check reports those."""
    try:
        image = open_image(value)
        width, height = image.size
        if _orientation(image) in _TURNED:
            width, height = height, width
    except Exception:
        return False
    kept = aspect_limited_size(width, height)
    return _worth_copying(_copy_size(*kept, cover, exact), width * height)


def _path_of(value: Any) -> str | None:
    """The file path of a {"bytes", "path"} value or a plain path; None for bytes-only values and PIL images."""
    if isinstance(value, dict):
        return value.get("path")
    return value if isinstance(value, str) else None


def _stored_size(value: Any) -> float:
    """Bytes the original takes (its file or its bytes); unknown sizes count as unlimited."""
    if isinstance(value, dict) and value.get("bytes"):
        return len(value["bytes"])
    path = _path_of(value)
    try:
        return os.path.getsize(path) if path else math.inf
    except OSError:
        return math.inf


def _problem(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, UnusableImage):
        return str(err)
    return f"unreadable image ({type(err).__name__}: {err})"


def check_image(
    value: Any,
    cover: tuple[int, int] | None = None,
    interpolation: str = "bilinear",
    lossless: bool = True,
    exact: bool = False,
):
    """(problem, value): why this image cannot be used (None when it decodes fully) and, with `cover`, its
    downscaled copy (`downscaled_copy`; the value itself when it has a problem or is small already)."""
    try:
        if cover is not None:
            return None, downscaled_copy(value, cover, interpolation, lossless, exact)
        image = open_image(value)
        if is_jpeg(image):
            image.draft("RGB", _CHECK_DRAFT_SIZE)
        image.load()
        if min(image.size) < 1:
            raise UnusableImage("image has no pixels")
    except Exception as err:  # whatever a file makes PIL raise, the file is reported, not the run stopped
        return _problem(err), value
    return None, value


def image_problem(value: Any) -> str | None:
    """Why this image cannot be used for training, or None when it decodes fully."""
    return check_image(value)[0]


def image_location(value: Any) -> str:
    """A printable name of an image for reports (its path when known)."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, str):
        return value
    return "<in-memory image>"


def undecoded_images(dataset, image_column: str):
    """The image column as {"bytes", "path"} values, without decoding every picture up front."""
    from datasets import Image

    return dataset.cast_column(image_column, Image(decode=False))[image_column]
