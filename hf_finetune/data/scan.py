"""The image scan before training: every picture read and decoded once, the unreadable ones found and dropped
(counted, never silently), a content digest of each (for the split-overlap check), and large pictures stored
as small copies in the datasets cache while they are open.

The scan is a `datasets.map`, so its result is cached by fingerprint like any other map: a second run over
the same data and sizes decodes nothing. Large on-disk splits are scanned in chunks, each cached on its own and
spread over processes: a run killed part-way resumes where it stopped, under one progress bar (rate, ETA).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
from collections.abc import Collection
from typing import Any, NamedTuple

from hf_finetune.data.images import (
    DOWNSCALE_MIN_FACTOR,
    DecodeSizes,
    check_image,
    image_location,
    may_downscale,
)

logger = logging.getLogger(__name__)

SCAN_PROBLEM_COLUMN = "__image_problem__"
SCAN_COPY_COLUMN = "__downscaled__"
SCAN_DIGEST_COLUMN = "__content_digest__"
# Bumped whenever what the scan stores changes (including anything `images.downscaled_copy` does: `datasets`
# fingerprints the map function by name, not by what it calls), so that older cached scans are not reused.
SCAN_VERSION = 5  # 4: 16-bit pictures scaled by bit depth; 5: content digests


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The scan's thread pool, set only while `scan_images` runs (not a map argument: it would enter the cache
# fingerprint, and cannot be hashed); a context variable, so that concurrent scans each see their own.
_scan_threads: contextvars.ContextVar = contextvars.ContextVar("scan_threads", default=None)


@contextlib.contextmanager
def _scan_pool():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, usable_cores()), thread_name_prefix="image-scan") as pool:
        token = _scan_threads.set(pool)
        try:
            yield
        finally:
            _scan_threads.reset(token)


# The scan of a large on-disk split runs in chunks of this many rows, each cached on its own: a run killed
# part-way resumes at the first chunk not yet done, and chunks are spread over processes.
SCAN_CHUNK_ROWS = 10_000


def _scan_chunk(chunk, map_kwargs: dict) -> int:
    """One chunk's scan (in a worker process): its result lands in the datasets cache, where the parent reads it."""
    import datasets

    datasets.disable_progress_bars()  # the parent's bar counts every chunk
    with _scan_pool():
        chunk.map(**map_kwargs)
    return len(chunk)


def _map_in_chunks(dataset, map_kwargs: dict, what: str):
    """`dataset.map(**map_kwargs)` for the scan: in one piece for in-memory or small datasets; otherwise in
    contiguous chunks of SCAN_CHUNK_ROWS, each its own cached map (so that a killed run loses at most the chunks
    in flight), computed in up to `usable_cores()` processes (each with its thread pool), under one progress
    bar with rate and ETA, and concatenated in order."""
    if not dataset.cache_files or len(dataset) <= SCAN_CHUNK_ROWS:
        with _scan_pool():
            return dataset.map(**map_kwargs, desc=what)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from datasets import concatenate_datasets
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled
    from tqdm.auto import tqdm

    count = -(-len(dataset) // SCAN_CHUNK_ROWS)
    chunks = [dataset.shard(count, i, contiguous=True) for i in range(count)]
    processes = min(usable_cores(), count)
    # Fork: the workers need nothing but the chunk (an on-disk dataset pickles as its file's path) and the
    # scan's functions, which the parent has imported already. Chunks done by an earlier, killed run load
    # from the cache in their worker at once.
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with (
        tqdm(total=len(dataset), desc=what, unit="pictures", disable=None) as progress,
        ProcessPoolExecutor(processes, mp_context=context) as pool,
    ):
        for done in as_completed([pool.submit(_scan_chunk, chunk, map_kwargs) for chunk in chunks]):
            progress.update(done.result())
    # Every chunk is in the cache now: this reads them back.
    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        parts = [chunk.map(**map_kwargs) for chunk in chunks]
    finally:
        if was_enabled:
            enable_progress_bar()
    return concatenate_datasets(parts)


def _files_signature(dataset, image_column: str) -> str | None:
    """A digest of (path, modification time, size) of the files that path-only image values point to.

    `datasets` fingerprints a table of paths (CSV / JSON lines) by the table alone, so without this a picture
    edited in place would keep its stale downscaled copy and its stale check result. Image folders are covered
    by `datasets` already; this costs one `stat` per file.
    """
    import pyarrow.compute as pc

    digest, files = hashlib.sha256(), 0
    for table in dataset.select_columns([image_column]).with_format("arrow").iter(batch_size=4096):
        column = table.column(image_column)
        paths = pc.struct_field(column, "path").to_pylist()
        path_only = pc.is_null(pc.struct_field(column, "bytes")).to_pylist()
        for path, only in zip(paths, path_only, strict=True):
            if not (only and path):
                continue
            try:
                stat = os.stat(path)
                digest.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
            files += 1
    return digest.hexdigest() if files else None


def read_with_digest(value: Any) -> tuple[str | None, Any]:
    """(content digest, value to decode): a picture's bytes are read once, for its digest and its decoding.
    (None, value) when there is nothing to read (e.g. a missing file): the check reports that."""
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except (OSError, TypeError):
            return None, value
        return hashlib.blake2b(data).hexdigest(), {"bytes": data, "path": path}
    return hashlib.blake2b(data).hexdigest(), value


def _check(value: Any, cover, interpolation: str, lossless: bool, exact: bool):
    """(problem, value, digest) of one picture: `check_image` on the bytes `read_with_digest` read, and the original
    value back unless a copy replaced it (the bytes read are not stored)."""
    digest, readable = read_with_digest(value)
    problem, result = check_image(readable, cover, interpolation, lossless, exact)
    return problem, value if result is readable else result, digest


def _scan_batch(
    batch,
    image_column: str,
    cover=None,
    interpolation: str = "bilinear",
    lossless: bool = True,
    exact: bool = False,
    version: int = 0,
    files: str | None = None,
):
    # `version` and `files` are unused here: as arguments they enter the map's cache fingerprint.
    # Threads rather than processes: PIL releases the GIL while it decodes, resizes and encodes, which is nearly
    # all of the work, and threads need neither forking nor the pickling of in-memory data.
    pool = _scan_threads.get()
    mapper = pool.map if pool is not None else map
    checked = list(
        mapper(lambda value: _check(value, cover, interpolation, lossless, exact), batch[image_column])
    )
    out = {
        SCAN_PROBLEM_COLUMN: [problem for problem, _, _ in checked],
        SCAN_DIGEST_COLUMN: [digest for _, _, digest in checked],
    }
    if cover is not None:
        out[image_column] = [value for _, value, _ in checked]
        out[SCAN_COPY_COLUMN] = [
            new is not old for (_, new, _), old in zip(checked, batch[image_column], strict=True)
        ]
    return out


def _any_may_downscale(dataset, image_column: str, cover, exact: bool) -> bool:
    """Whether any picture of `dataset` is large enough for a copy, judged from file headers; stops at the first."""
    for batch in dataset.select_columns([image_column]).iter(batch_size=256):
        if any(may_downscale(value, cover, exact) for value in batch[image_column]):
            return True
    return False


class ImageScan(NamedTuple):
    splits: Any  # datasets.DatasetDict without the unreadable pictures (and with the copies)
    bad: list[dict[str, Any]]  # {"split", "index", "image", "problem"} of each unreadable picture
    # Per split, the content digest of every row as given (unreadable ones included; None: nothing to read).
    digests: dict[str, list[str | None]]


def scan_images(
    splits,
    image_column: str,
    downscale: DecodeSizes | None = None,
    copy_splits: Collection[str] | None = None,
) -> ImageScan:
    """Read and decode every image once before training; drop the unreadable ones and list them, and give the
    content digest of every picture (for `splits.check_split_overlap`), from the same read.

    With `downscale`, the same pass stores each picture that is much larger than the transforms need as an
    upright RGB copy that just covers `downscale.cover(split)`, so that every epoch decodes a small picture
    instead of the original (a 12-megapixel photo bound for a 224-pixel model: a tenth of the pixels). Copies
    of evaluation splits are lossless; training copies are quality-95 JPEGs (`images.downscaled_copy`).
    Only the splits named in `copy_splits` get copies (None: every split); the others are only checked.
    In-memory datasets get no copies (nothing of theirs is cached). The scan is a `datasets.map`, so for
    on-disk datasets its result, copies included, is cached by fingerprint (input data, the listed files' times
    and sizes, sizes, filter, SCAN_VERSION): a second run over the same data decodes nothing, and a run with
    another checkpoint size or crop scale, or after a picture changed, makes new ones.
    """
    from datasets import DatasetDict, Features, Image, Value

    bad: list[dict[str, Any]] = []
    cleaned, digests = {}, {}
    for name, dataset in splits.items():
        # In-memory datasets are not cached: copies would only add to the memory the data already takes.
        copies = (
            downscale is not None and dataset.cache_files and (copy_splits is None or name in copy_splits)
        )
        cover = downscale.cover(name) if copies else None
        undecoded = dataset.cast_column(image_column, Image(decode=False))
        if cover is not None and not _any_may_downscale(
            undecoded, image_column, cover, downscale.exact(name)
        ):
            # A scan that stores copies writes the whole image column again; with nothing to copy (pictures
            # already about the size the model needs), a check that writes only its findings does.
            logger.info(
                "Downscaled copies: %s needs none (no picture is more than %gx the %dx%d the transforms need)",
                name,
                DOWNSCALE_MIN_FACTOR,
                *cover,
            )
            cover = None
        if cover is None:
            undecoded = undecoded.select_columns([image_column])
        # Typed up front: a first batch of all-readable images would otherwise fix the column as null.
        if cover is not None:
            features = undecoded.features.copy()
            features[SCAN_PROBLEM_COLUMN] = Value("string")
            features[SCAN_COPY_COLUMN] = Value("bool")
        else:
            features = Features({SCAN_PROBLEM_COLUMN: Value("string")})
        features[SCAN_DIGEST_COLUMN] = Value("string")
        map_kwargs = {
            "function": _scan_batch,
            "batched": True,
            "batch_size": 64,
            "fn_kwargs": {
                "image_column": image_column,
                "cover": tuple(cover) if cover is not None else None,
                "interpolation": downscale.interpolation if downscale is not None else "bilinear",
                # Evaluation sees exactly the pixels it would see without copies; training copies may be lossy.
                "lossless": downscale is None or downscale.lossless(name),
                "exact": downscale is not None and downscale.exact(name),
                "version": SCAN_VERSION,
                "files": _files_signature(undecoded, image_column),
            },
            "features": features,
            # A check alone writes only its findings, not another copy of the images (for datasets that
            # embed their image bytes, that would be the whole dataset again).
            "remove_columns": None if cover is not None else [image_column],
        }
        what = f"{'Checking and downscaling' if cover else 'Checking'} {name} images"
        scanned = _map_in_chunks(undecoded, map_kwargs, what)
        problems = scanned[SCAN_PROBLEM_COLUMN]
        digests[name] = scanned[SCAN_DIGEST_COLUMN]
        bad_rows = [i for i, problem in enumerate(problems) if problem is not None]
        for i in bad_rows:
            bad.append(
                {
                    "split": name,
                    "index": i,
                    "image": image_location(undecoded[i][image_column]),
                    "problem": problems[i],
                }
            )
        if cover is not None:
            copies = sum(scanned[SCAN_COPY_COLUMN])
            logger.info(
                "Downscaled copies (datasets cache): %s %d of %d picture(s), covering %dx%d%s, %s",
                name,
                copies,
                len(scanned),
                *cover,
                " exactly" if downscale.exact(name) else "",
                "lossless" if downscale.lossless(name) else "JPEG quality 95",
            )
            scan_columns = [SCAN_PROBLEM_COLUMN, SCAN_COPY_COLUMN, SCAN_DIGEST_COLUMN]
            dataset = scanned.remove_columns(scan_columns).cast_column(
                image_column, dataset.features[image_column]
            )
        if bad_rows:
            keep = sorted(set(range(len(dataset))) - set(bad_rows))
            dataset = dataset.select(keep)
        cleaned[name] = dataset
    return ImageScan(DatasetDict(cleaned), bad, digests)
