"""Multi-label demo material from real pictures: mosaics of two or three of scikit-learn's handwritten digits
(different digits) in a 2 x 2 grid of cells, labelled with the set of digits they show.

`build_digit_mosaics` writes the PNGs and a CSV (`image`, `labels` as `3;7`), exactly what a user would point
`train_file` at; the same arguments give the same files. Each digit scan is used in at most one mosaic, so
no two mosaics share a picture of a digit.
"""

from __future__ import annotations

import csv
from pathlib import Path

MOSAIC_CSV = "mosaics.csv"


def build_digit_mosaics(
    folder: str | Path,
    num_images: int = 300,
    digits: tuple[int, ...] = tuple(range(10)),
    cell_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write `num_images` mosaics (PNG, 2 x 2 cells of `cell_size` px; two or three cells hold a digit, the
    others stay blank paper) and `mosaics.csv` into `folder`; returns the CSV's path."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    pools = {d: list(rng.permutation(np.flatnonzero(data.target == d))) for d in digits}
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_images):
        count = int(rng.integers(2, 4))
        available = [d for d in digits if pools[d]]
        if len(available) < count:
            raise ValueError(f"Not enough digit scans for {num_images} mosaics of {digits}; ask for fewer.")
        shown = sorted(int(d) for d in rng.choice(available, count, replace=False))
        cells = rng.permutation(4)[:count]
        canvas = np.full((2 * cell_size, 2 * cell_size), 255, dtype=np.uint8)
        for digit, cell in zip(shown, cells, strict=True):
            scan = data.images[pools[digit].pop()]
            # 0-16 ink values -> white paper, dark ink, like a scan; upscaled so the model sees more than 8 px.
            gray = (255 - scan * (255 / 16)).astype(np.uint8)
            tile = np.asarray(Image.fromarray(gray).resize((cell_size, cell_size), Image.Resampling.BICUBIC))
            row, column = divmod(int(cell), 2)
            canvas[row * cell_size : (row + 1) * cell_size, column * cell_size : (column + 1) * cell_size] = (
                tile
            )
        name = f"images/mosaic_{index:04d}.png"
        Image.fromarray(canvas).convert("RGB").save(folder / name)
        rows.append({"image": name, "labels": ";".join(map(str, shown))})
    path = folder / MOSAIC_CSV
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return path
