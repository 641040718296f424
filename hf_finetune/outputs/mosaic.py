"""Picture grids as one PNG: thumbnails pasted into a mosaic with PIL, a caption under each, a title on top.

Used by the run's most-confident-errors grid and by the inspection's leakage, duplicate and label-issue grids.
PIL alone, not matplotlib: laying out and rasterising 16 axes with their titles took about 0.9 s a grid on 2
cores (most of a short run's report time); the mosaic takes a tenth of that.

    write_mosaic(path, [[(image, "true: cat\npred: dog (p=0.93)")], ...], "Most confident errors", tile=256)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def thumbnail(value, size: int = 256):
    """A picture value (PIL image or {"bytes", "path"}) as an RGB image that fits a `size` square."""
    from hf_finetune.data.images import load_rgb

    path = value.get("path") if isinstance(value, dict) else None
    if path and os.path.isabs(path) and os.path.isfile(path):
        # The original file rather than the bytes of a downscaled training copy, which may be smaller than this.
        value = {"bytes": None, "path": path}
    image = load_rgb(value, (size, size))
    image.thumbnail((size, size))
    return image


@dataclass(frozen=True)
class MosaicLayout:
    """Sizes in pixels: each thumbnail fits a `tile` square; `caption_lines` lines of `font_size` text under it."""

    tile: int = 112
    caption_lines: int = 3
    font_size: int = 9
    title_size: int = 14
    columns: int = 4  # pictures per mosaic row

    @property
    def caption(self) -> int:
        return self.caption_lines * (self.font_size + 2) + 7

    @property
    def title(self) -> int:
        return 2 * self.title_size


def write_mosaic(
    path: Path, cells: Sequence[Sequence[tuple[Any, str]]], title: str, layout: MosaicLayout = MosaicLayout()
) -> None:
    """A PNG at `path` of `cells`: each a group of (image value, caption) shown side by side (one picture, or a
    pair), as many groups to a row as fit in `layout.columns` pictures. A value is a PIL image or a
    `datasets.Image(decode=False)` value; one that cannot be read is a blank tile captioned "(unreadable)", so
    that a picture gone since evaluation does not cost the rest of the report. Written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    from hf_finetune.outputs.atomic import atomic_file

    per_group = max(len(group) for group in cells)
    groups = max(1, layout.columns // per_group)
    rows, columns = math.ceil(len(cells) / groups), per_group * groups
    tile, step = layout.tile, layout.tile + layout.caption
    mosaic = Image.new("RGB", (columns * tile, layout.title + rows * step), "white")
    draw = ImageDraw.Draw(mosaic)
    font = ImageFont.load_default(size=layout.font_size)
    title_font = ImageFont.load_default(size=layout.title_size)
    draw.text((mosaic.width / 2, layout.title / 2), title, fill="black", anchor="mm", font=title_font)
    for n, group in enumerate(cells):
        for k, (value, caption) in enumerate(group):
            x, y = ((n % groups) * per_group + k) * tile, layout.title + (n // groups) * step
            try:
                thumb = thumbnail(value, tile - 4)
                # Centred across, at the foot of its square: a landscape picture sits on its caption.
                mosaic.paste(thumb, (x + (tile - thumb.width) // 2, y + tile - 2 - thumb.height))
            except Exception as err:  # noqa: BLE001  (see the docstring: one picture, not the report)
                logger.warning("Could not show a picture in %s: %s", path.name, err)
                caption = "(unreadable)\n" + caption
            draw.multiline_text(
                (x + tile / 2, y + tile + 2),
                caption,
                fill="black",
                font=font,
                anchor="ma",
                align="center",
                spacing=2,
            )
    with atomic_file(path, "wb") as handle:
        # zlib level 3: a grid of photographs encodes in a third of the default level's time, 9 % larger.
        mosaic.save(handle, format="PNG", compress_level=3)
