"""What the pictures are like: class balance, sizes, aspect ratios, greyscale share, tiny pictures.

Sizes and modes come from each file's header (no full decode); only a picture stored in colour is decoded, at
a small draft size, to tell whether its channels are in fact equal (a greyscale scan saved as RGB).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# Largest difference between the colour channels of a downscaled copy below which a picture counts as grey
# (JPEG's chroma rounding leaves a few levels in a grey scan).
GREY_TOLERANCE = 3
EXTREME_ASPECT = 3.0  # wider than 3:1 or taller than 1:3


@dataclass(frozen=True)
class Picture:
    """One picture's header facts: size, mode, and whether it is grey."""

    width: int
    height: int
    mode: str
    grey: bool


def _is_grey(value: Any) -> Picture:
    import numpy as np

    from hf_finetune.data.images import open_image

    with open_image(value) as image:
        width, height, mode = image.width, image.height, image.mode
        grey = mode in GREY_MODES
        if not grey:
            image.draft("RGB", (64, 64))  # JPEG: decodes at 1/2 .. 1/8 scale, a fraction of the work
            small = image.convert("RGB")
            small.thumbnail((64, 64))
            pixels = np.asarray(small, dtype=np.int16)
            grey = bool((pixels.max(axis=2) - pixels.min(axis=2)).max() <= GREY_TOLERANCE)
    return Picture(width, height, mode, grey)


def scan_pictures(values, split: str) -> list[Picture | None]:
    """Header facts of every picture of a split ({"bytes", "path"} values); None for one that cannot be read."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from hf_finetune.data.scan import usable_cores

    def one(value):
        try:
            return _is_grey(value)
        except Exception:  # the image check dropped unreadable pictures; one gone since is counted, not fatal
            return None

    # Threads: PIL releases the GIL while it reads and decodes.
    with ThreadPoolExecutor(max_workers=min(16, usable_cores())) as pool:
        return list(
            tqdm(pool.map(one, values), total=len(values), desc=f"Scanning {split} pictures", disable=None)
        )


def _summary(numbers: list[float]) -> dict[str, float]:
    import numpy as np

    if not numbers:
        return {}
    a = np.asarray(numbers, dtype=np.float64)
    return {
        "min": float(a.min()),
        "p5": float(np.percentile(a, 5)),
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
    }


def split_stats(
    pictures: list[Picture | None], labels: list[int], label_names: list[str], tiny_side: int
) -> dict[str, Any]:
    """Statistics of one split, with the rows of its tiny, extreme-aspect and unreadable pictures."""
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(label_names))
    read = [(i, p) for i, p in enumerate(pictures) if p is not None]
    present = counts[counts > 0]
    modes: dict[str, int] = {}
    for _, p in read:
        modes[p.mode] = modes.get(p.mode, 0) + 1
    aspects = [p.width / p.height for _, p in read if p.height]
    return {
        "pictures": len(pictures),
        "class_counts": {name: int(c) for name, c in zip(label_names, counts, strict=True)},
        # Largest class over smallest present one: 1.0 is balanced.
        "imbalance_ratio": round(float(present.max() / present.min()), 3) if len(present) else None,
        "width": _summary([p.width for _, p in read]),
        "height": _summary([p.height for _, p in read]),
        "aspect_ratio": _summary(aspects),
        "modes": dict(sorted(modes.items())),
        "greyscale": sum(p.grey for _, p in read),
        "greyscale_share": round(sum(p.grey for _, p in read) / len(read), 4) if read else None,
        "tiny_rows": [i for i, p in read if min(p.width, p.height) < tiny_side],
        "extreme_aspect_rows": [
            i for i, p in read if p.height and not 1 / EXTREME_ASPECT <= p.width / p.height <= EXTREME_ASPECT
        ],
        "unreadable_rows": [i for i, p in enumerate(pictures) if p is None],
    }
