"""Image hygiene: every picture reaches the model as 8-bit RGB, and unreadable files are found up front."""

from __future__ import annotations

import io
from typing import Any

# Decoding a 12-megapixel JPEG in full only to check that it is readable is wasted work: PIL's draft mode
# decodes JPEGs at a reduced scale, which still reads every entropy-coded block (so truncation shows).
_CHECK_DRAFT_SIZE = (64, 64)


def to_rgb(image):
    """Convert any PIL image (L, LA, P, PA, RGBA, CMYK, I;16, I, F, 1, ...) to 8-bit RGB.

    Transparent areas are composited onto white (a plain `convert("RGB")` shows whatever colour happens to be
    stored under the alpha channel, often black), and 16/32-bit images are rescaled to 0-255 instead of being
    clipped (which turns most 16-bit photographs white).
    """
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if high > 255 or low < 0 or image.mode == "F":
            # Scale by the container's range, not the image's own extremes, so that brightness is kept.
            top = 65535.0 if image.mode.startswith("I;16") or high > 255 else max(high, 1.0)
            array = np.clip(array, 0, None) / top * 255.0
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(value: Any):
    """Open a `datasets.Image(decode=False)` value ({"bytes", "path"}), a path or a PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if not value:
        raise ValueError("no image data")
    return Image.open(value)


def image_problem(value: Any) -> str | None:
    """Why this image cannot be used for training, or None when it decodes fully."""
    from PIL import Image

    try:
        image = open_image(value)
        if image.format == "JPEG":
            image.draft("RGB", _CHECK_DRAFT_SIZE)
        image.load()
        width, height = image.size
        if width < 1 or height < 1:
            return "image has no pixels"
    except FileNotFoundError:
        return "file not found"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"unreadable image ({type(err).__name__}: {err})"
    return None


def image_location(value: Any) -> str:
    """A printable name of an image for reports (its path when known)."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, str):
        return value
    return "<in-memory image>"
