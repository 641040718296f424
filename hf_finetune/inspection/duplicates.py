"""Duplicates within and across splits: identical files by content hash; near-duplicates found by the cosine
similarity of the backbone features the probe caches and confirmed pixel by pixel (small grey thumbnails). A
pair across splits is leakage: a picture the model trains on (or is tuned on) is also one it is measured on.

Why two tests: a near-duplicate is the same picture modulo encoding and resizing. The features find such pairs
among millions cheaply, but they describe what a picture shows, so two different scans of the same digit (or two
photos of one scene) come as close as a picture and its copy. The pixels tell those apart: a re-encoded, resized
copy keeps its 16 x 16 grey thumbnail almost exactly (correlation >= 0.994 on the held-out pair set of
benchmarks/inspect_data.py), a different picture of the same thing rarely does (above 0.99 for 1 of 200 there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

# Width of the whitened space near-duplicates are compared in (at most; see `comparison_space`).
WHITENED_DIMS = 256
# Similarity rows computed at once: a (rows x other split) float32 block stays near 256 MiB whatever the size.
BLOCK_ELEMENTS = 2**26
# Side of the grey thumbnails near-duplicate candidates are confirmed on (see `pixel_thumbnail`).
PIXEL_SIDE = 16


@dataclass(frozen=True)
class Pair:
    """Two pictures (split, row) that are the same file contents (`exact`) or look alike (`near`)."""

    split_a: str
    index_a: int
    split_b: str
    index_b: int
    similarity: float
    exact: bool
    pixel_similarity: float | None = None  # correlation of the grey thumbnails (near pairs, when checked)

    @property
    def cross_split(self) -> bool:
        return self.split_a != self.split_b


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (all-zero rows stay zero), so that dot products are cosine similarities."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def pixel_thumbnail(value) -> np.ndarray:
    """A picture as `PIXEL_SIDE` x `PIXEL_SIDE` grey levels (area-averaged), mean-centred and scaled to length 1:
    the dot product of two is the correlation of their thumbnails, blind to brightness and contrast changes and
    to the noise of re-encoding (averaged away), but not to what is where in the picture."""
    import numpy as np
    from PIL import Image

    from hf_finetune.data.images import load_rgb

    grey = load_rgb(value, (4 * PIXEL_SIDE, 4 * PIXEL_SIDE)).convert("L")
    x = np.asarray(grey.resize((PIXEL_SIDE, PIXEL_SIDE), Image.Resampling.BOX), dtype=np.float32).ravel()
    x = x - x.mean()
    return x / max(float(np.linalg.norm(x)), 1e-6)


def pixel_similarities(candidates: list[tuple[str, int, str, int]], values: dict[str, list]) -> list[float]:
    """The thumbnail correlation (`pixel_thumbnail`) of each (split, row, split, row) pair; each picture read once.
    A picture that cannot be read any more scores -1 (never confirmed)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from hf_finetune.data.scan import usable_cores

    def read(key):
        try:
            return key, pixel_thumbnail(values[key[0]][key[1]])
        except (
            Exception
        ) as err:  # gone or changed since the scan: reported, never a crash of the whole report
            logger.warning("Could not compare %s row %d pixel by pixel: %s", *key, err)
            return key, None

    rows = sorted({(s, i) for a, i, b, j in candidates for s, i in ((a, i), (b, j))})
    # PIL decodes outside the GIL: threads read the pictures side by side.
    with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        read_rows = tqdm(
            pool.map(read, rows),
            total=len(rows),
            desc="Near-duplicates: pixels",
            unit="pictures",
            disable=None,
        )
        thumbs = {key: thumb for key, thumb in read_rows if thumb is not None}
    return [
        float(thumbs[a, i] @ thumbs[b, j]) if (a, i) in thumbs and (b, j) in thumbs else -1.0
        for a, i, b, j in candidates
    ]


def comparison_space(features: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """The features as near-duplicates are compared: PCA-whitened on train (at most `WHITENED_DIMS` components,
    and no more than half as many as training rows: with nearly as many components as rows, whitening makes every
    training picture equally far from every other, and a copy no closer than a stranger).

    Whitening is what image retrieval does with CNN descriptors (Jégou and Chum, ECCV 2012): in the raw pooled
    features a few strong directions, shared by every picture of a kind, dominate the cosine, so that two
    different scans of a "1" look as alike as a picture and its re-encoded copy. Measured on the held-out pair
    set of benchmarks/inspect_data.py (real EfficientNet-Lite0, digits), whitening separates the two far better than
    raw or per-dimension standardised features.
    """
    from sklearn.decomposition import PCA

    train = features["train"]
    dims = int(min(WHITENED_DIMS, train.shape[1], max(2, len(train) // 2)))
    pca = PCA(n_components=dims, whiten=True, random_state=seed).fit(train)
    return {split: pca.transform(x).astype("float32") for split, x in features.items()}


def similar_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float, progress=None):
    """(i, j, cosine) of every row pair with cosine >= threshold, in blocks; `b=None`: pairs within `a`, i < j."""
    import numpy as np

    same = b is None
    a = unit_rows(a)
    b = a if same else unit_rows(b)
    block = max(1, BLOCK_ELEMENTS // max(1, len(b)))
    rows_i, rows_j, values = [], [], []
    for start in range(0, len(a), block):
        sims = a[start : start + block] @ b.T
        if same:  # each unordered pair once, never a picture with itself
            sims = _upper(sims, start)
        i, j = np.nonzero(sims >= threshold)
        rows_i.append(i + start)
        rows_j.append(j)
        values.append(sims[i, j])
        if progress is not None:
            progress.update(len(sims))
    if not values:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(rows_i), np.concatenate(rows_j), np.concatenate(values)


def _upper(sims: np.ndarray, start: int) -> np.ndarray:
    """Zero every entry (r, c) of a block starting at row `start` with c <= start + r."""
    import numpy as np

    columns = np.arange(sims.shape[1])[None, :]
    rows = np.arange(sims.shape[0])[:, None] + start
    return np.where(columns > rows, sims, 0.0)


def exact_groups(digests: dict[str, list[str | None]]) -> list[list[tuple[str, int]]]:
    """Groups of (split, row) whose file contents are identical (same digest), two or more per group."""
    by_digest: dict[str, list[tuple[str, int]]] = {}
    for split, values in digests.items():
        for index, digest in enumerate(values):
            if digest is not None:
                by_digest.setdefault(digest, []).append((split, index))
    return [members for members in by_digest.values() if len(members) > 1]


def find_pairs(
    features: dict[str, np.ndarray],
    digests: dict[str, list[str | None]],
    threshold: float,
    values: dict[str, list] | None = None,
    pixel_threshold: float = 0.0,
) -> list[Pair]:
    """Every exact and near-duplicate pair, within and across splits; leakage (across) first, then by similarity.

    `features`: per split, rows in dataset order (see `comparison_space`). `digests`: per split,
    the content hash of each picture (None when unreadable). An exact pair is listed once, as exact, whatever
    its feature similarity. A near pair has a feature cosine >= `threshold` and, with `values` (each picture's
    image value, per split) and `pixel_threshold` > 0, a thumbnail correlation >= `pixel_threshold`.
    """
    from tqdm.auto import tqdm

    splits = list(features)
    pairs: dict[tuple[str, int, str, int], Pair] = {}
    for members in exact_groups(digests):
        for n, (split_a, index_a) in enumerate(members):
            for split_b, index_b in members[n + 1 :]:
                key = (split_a, index_a, split_b, index_b)
                pairs[key] = Pair(split_a, index_a, split_b, index_b, 1.0, exact=True)
    candidates: dict[tuple[str, int, str, int], float] = {}
    work = sum(len(features[a]) for n, a in enumerate(splits) for _ in splits[n:])
    with tqdm(total=work, desc="Near-duplicates: features", unit="rows", disable=None) as progress:
        for n, split_a in enumerate(splits):
            for split_b in splits[n:]:
                other = None if split_b == split_a else features[split_b]
                rows_a, rows_b, sims = similar_pairs(features[split_a], other, threshold, progress)
                for i, j, sim in zip(rows_a.tolist(), rows_b.tolist(), sims.tolist(), strict=True):
                    key = (split_a, i, split_b, j)
                    if key not in pairs:
                        candidates[key] = round(float(sim), 6)
    keys = list(candidates)
    checked = values is not None and pixel_threshold > 0
    pixels = pixel_similarities(keys, values) if checked and keys else [None] * len(keys)
    for key, pixel in zip(keys, pixels, strict=True):
        if pixel is None or pixel >= pixel_threshold:
            pixel = None if pixel is None else round(pixel, 6)
            pairs[key] = Pair(*key, candidates[key], exact=False, pixel_similarity=pixel)
    if checked:
        logger.info(
            "Near-duplicates: %d of %d pair(s) with feature cosine >= %s are alike pixel by pixel (>= %s).",
            sum(not p.exact for p in pairs.values()),
            len(keys),
            threshold,
            pixel_threshold,
        )
    order = {split: n for n, split in enumerate(splits)}
    return sorted(
        pairs.values(),
        key=lambda p: (not p.cross_split, not p.exact, -p.similarity, order[p.split_a], p.index_a, p.index_b),
    )


def leaked_training_rows(pairs: list[Pair]) -> list[int]:
    """Training rows that duplicate a picture of another split: what `exclude: [leakage]` drops."""
    rows = {p.index_a for p in pairs if p.cross_split and p.split_a == "train"}
    rows |= {p.index_b for p in pairs if p.cross_split and p.split_b == "train"}
    return sorted(rows)
