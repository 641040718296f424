"""Data: load a source, detect the image and label columns, make stratified splits, find unreadable images.

Sources: a Hub dataset, a local image folder per split, a CSV / JSON-lines file per split, or an in-memory
`Dataset` / `DatasetDict`. Everything ends up as a `DatasetDict` with `train`, `validation` and, when there is
one, `test`, sharing one `ClassLabel` label column. Pixels are never materialised: transforms are attached
lazily by `hf_finetune.data.transforms`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_finetune.config import VALIDATION_SPLIT_NAMES, DataArguments
from hf_finetune.data.images import (
    DOWNSCALE_MIN_FACTOR,
    DecodeSizes,
    check_image,
    image_location,
    may_downscale,
)
from hf_finetune.errors import UserError
from hf_finetune.hub import check_hub_repo, offline, warn_if_local_shadows

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".jfif",
}
LABEL_COLUMN_NAMES = ("label", "labels", "class", "category", "target", "fine_label")
PATH_COLUMN_NAMES = ("image", "image_path", "path", "file", "filename", "file_name", "filepath", "img")
SCAN_PROBLEM_COLUMN = "__image_problem__"
SCAN_COPY_COLUMN = "__downscaled__"
SOURCE_ROW_COLUMN = "__source_row__"
STRING_DTYPES = ("string", "large_string")


@dataclass
class PreparedData:
    """What the rest of a run needs to know about the data."""

    splits: Any  # datasets.DatasetDict with train, validation and optionally test
    image_column: str
    label_column: str
    labels: list[str]
    bad_images: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    # The data source's folders (image folders, the tables' folders): published files name pictures from them.
    roots: list[str] = field(default_factory=list)

    def image_name(self, value: Any) -> str:
        """How a picture is named in files that can be published: its path relative to the data source (the
        image folder, or the table's folder), never an absolute path of this machine."""
        location = image_location(value)
        if not os.path.isabs(location):
            return location
        path = Path(location)
        for root in sorted(self.roots, key=len, reverse=True):
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return path.name  # e.g. a file in the datasets cache


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------
def _split_files(args: DataArguments, kind: str) -> dict[str, str]:
    return {
        split: getattr(args, f"{split}_{kind}")
        for split in ("train", "validation", "test")
        if getattr(args, f"{split}_{kind}") is not None
    }


def _folder_rows(paths: list[str], labels: list[int], stamps: list[tuple[int, int]]):
    # `stamps` is unused here: it is in gen_kwargs only so that the cache key changes with the files.
    for path, label in zip(paths, labels, strict=True):
        yield {"image": path, "label": label}


def _scan_image_folder(split: str, folder: str) -> dict[str, list[str]]:
    """Pictures of one image folder by class: the class is the first folder level, and pictures in deeper
    sub-folders (`brick/batch1/`, `2023/`) belong to it. Hidden files and folders, and output folders of
    hf-finetune (they hold its manifest), are not data. One `os.walk`; paths are absolute."""
    from collections import Counter

    from hf_finetune.outputs.manifest import MANIFEST

    root = Path(folder)
    if not root.is_dir():
        raise UserError(
            f"{split}_dir={folder} is not a folder. Point it at a folder with one sub-folder per class "
            f"(e.g. {folder}/cat/001.jpg, {folder}/dog/002.jpg)."
        )
    if (root / MANIFEST).is_file():
        raise UserError(
            f"{split}_dir={folder} is an output folder of hf-finetune (it holds {MANIFEST}), not pictures. Point "
            f"{split}_dir at the image folder, and keep output_dir outside it."
        )
    root = root.resolve()
    by_class: dict[str, list[str]] = {}
    loose, ignored, outputs, deeper = [], [], [], Counter()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if here != root and (here / MANIFEST).is_file():
            outputs.append(here.relative_to(root).as_posix())
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        parts = here.relative_to(root).parts
        for name in sorted(f for f in filenames if not f.startswith(".")):
            relative = Path(*parts, name).as_posix()
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(relative)
            elif not parts:
                loose.append(relative)
            else:
                # Names are stripped: ` grass` and `grass` are one class.
                by_class.setdefault(parts[0].strip(), []).append(str(here / name))
                deeper[parts[0].strip()] += len(parts) > 1
    if outputs:
        logger.warning(
            "%s_dir: not used as data: %s (output folder(s) of hf-finetune, holding %s).",
            split,
            ", ".join(outputs),
            MANIFEST,
        )
    if ignored:
        logger.warning(
            "%s_dir: %d file(s) without an image extension were not used (e.g. %s).",
            split,
            len(ignored),
            ", ".join(ignored[:3]),
        )
    if not by_class and not loose:
        raise UserError(
            f"{split}_dir={folder} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}). Put the "
            "pictures in one sub-folder per class."
        )
    if loose:
        raise UserError(
            f"{split}_dir={folder} has {len(loose)} picture(s) directly inside it, not in a class folder (e.g. "
            f"{', '.join(loose[:3])}), so they have no label. The class of a picture is the first folder level "
            f"under {split}_dir: move them into one sub-folder per class, named after the class."
        )
    if sum(deeper.values()):
        logger.info(
            "%s_dir: the class is the first folder level; %d picture(s) in deeper sub-folders belong to their "
            "class (%s).",
            split,
            sum(deeper.values()),
            ", ".join(f"{name} {count}" for name, count in sorted(deeper.items()) if count),
        )
    return by_class


def _load_image_folders(folders: dict[str, str], cache_dir: str | None):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    scanned = {split: _scan_image_folder(split, folder) for split, folder in folders.items()}
    names = sorted({name for by_class in scanned.values() for name in by_class})
    ids = {name: i for i, name in enumerate(names)}
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    splits = {}
    for split, by_class in scanned.items():
        rows = sorted((path, ids[name]) for name, paths in by_class.items() for path in paths)
        paths, labels = [p for p, _ in rows], [label for _, label in rows]
        # A generator dataset is written to the datasets cache, keyed by its gen_kwargs, so that the image
        # check, its downscaled copies and cached features are reused like any on-disk dataset's. The rows hold
        # paths only, so each file's modification time and size are part of the key: an edited picture (same
        # path) makes a new dataset, as `load_dataset("imagefolder")` does.
        stamps = [(stat.st_mtime_ns, stat.st_size) for stat in map(os.stat, paths)]
        splits[split] = Dataset.from_generator(
            _folder_rows,
            features=features,
            gen_kwargs={"paths": paths, "labels": labels, "stamps": stamps},
            cache_dir=cache_dir,
        )
    return DatasetDict(splits)


def _load_tables(files: dict[str, str], image_column: str | None, cache_dir: str | None):
    from datasets import Image, load_dataset

    suffixes = {Path(f).suffix.lower() for f in files.values()}
    for split, path in files.items():
        if not Path(path).is_file():
            raise UserError(f"{split}_file={path} does not exist. Give the path of a CSV or JSON-lines file.")
    if suffixes <= {".csv", ".tsv"}:
        kwargs = {"delimiter": "\t"} if suffixes == {".tsv"} else {}
        raw = load_dataset("csv", data_files=files, cache_dir=cache_dir, **kwargs)
    elif suffixes <= {".json", ".jsonl"}:
        raw = load_dataset("json", data_files=files, cache_dir=cache_dir)
    else:
        raise UserError(
            f"Data files {sorted(files.values())} must all be .csv/.tsv or all .json/.jsonl (found "
            f"{sorted(suffixes)})."
        )
    columns = raw["train"].column_names if "train" in raw else next(iter(raw.values())).column_names
    column = image_column or next((c for c in columns if c.lower() in PATH_COLUMN_NAMES), None)
    if column is None or column not in columns:
        raise UserError(
            f"Could not find the image-path column in {sorted(files.values())}: columns are {columns}. "
            "Set `image_column` to the column holding the image file paths."
        )
    for split, path in files.items():
        base = Path(path).resolve().parent
        dtype = getattr(raw[split].features[column], "dtype", None)
        if dtype not in STRING_DTYPES:
            raise UserError(
                f"Column `{column}` of {path} holds {dtype or raw[split].features[column]} values, not image "
                "paths. Set `image_column` to the column with the file paths."
            )

        # Relative paths are relative to the table's own folder, not to where the command runs.
        def resolve(batch, base=base):
            batch[column] = [
                None if p is None else (str(p) if Path(str(p)).is_absolute() else str(base / str(p)))
                for p in batch[column]
            ]
            return batch

        raw[split] = raw[split].map(resolve, batched=True, desc=f"Resolving {split} image paths")
    return raw.cast_column(column, Image())


def load_raw_splits(args: DataArguments, cache_dir: str | None = None, dataset=None):
    """Load whichever source the arguments name, as a `DatasetDict` keyed by the source's own split names."""
    from datasets import Dataset, DatasetDict

    if dataset is not None:
        if isinstance(dataset, Dataset):
            return DatasetDict({"train": dataset})
        if isinstance(dataset, DatasetDict):
            return dataset
        raise UserError(f"`dataset` must be a datasets.Dataset or DatasetDict, not {type(dataset).__name__}.")
    folders, tables = _split_files(args, "dir"), _split_files(args, "file")
    if args.dataset_name:
        return _load_hub_dataset(args, cache_dir)
    if folders:
        if "train" not in folders:
            raise UserError("validation_dir/test_dir were given without train_dir: set train_dir too.")
        return _load_image_folders(folders, cache_dir)
    if tables:
        if "train" not in tables:
            raise UserError("validation_file/test_file were given without train_file: set train_file too.")
        return _load_tables(tables, args.image_column, cache_dir)
    raise UserError(
        "No data given: set `dataset_name` (a Hub dataset), `train_dir` (an image folder with one sub-folder "
        "per class) or `train_file` (a CSV / JSON-lines file of image path + label)."
    )


def _load_hub_dataset(args: DataArguments, cache_dir: str | None):
    from datasets import DatasetDict, load_dataset

    warn_if_local_shadows(args.dataset_name, "dataset_name")
    check_hub_repo(
        args.dataset_name,
        args.dataset_revision,
        "dataset",
        "dataset_name",
        "use local pictures: --train_dir (an image folder, one sub-folder per class) or --train_file (a CSV).",
        cache_dir=cache_dir,
        config_name=args.dataset_config,
    )
    try:
        raw = load_dataset(
            args.dataset_name, args.dataset_config, revision=args.dataset_revision, cache_dir=cache_dir
        )
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as err:
        raise UserError(
            f"Could not load dataset `{args.dataset_name}`"
            + (f" (config {args.dataset_config})" if args.dataset_config else "")
            + f": {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            + (
                "Offline mode is on, so only datasets already in the cache can load. "
                if offline("dataset")
                else ""
            )
            + "Check the id and your network, or use local data instead: --train_dir/--validation_dir/--test_dir "
            "(image folders, one sub-folder per class) or --train_file (CSV / JSON-lines of path + label)."
        ) from None
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({args.train_split: raw})
    return raw


# --------------------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------------------
def detect_columns(
    features, image_column: str | None, label_column: str | None, where: str
) -> tuple[str, str]:
    """Find the image column (an `Image` feature) and the label column (`ClassLabel`, else a known name)."""
    from datasets import ClassLabel, Image

    columns = list(features)
    if image_column is not None:
        if image_column not in features:
            raise UserError(
                f"image_column={image_column!r} is not a column of {where}; the columns are {columns}. "
                "Set `image_column` to one of them."
            )
        if not isinstance(features[image_column], Image):
            raise UserError(
                f"image_column={image_column!r} of {where} holds {features[image_column]!r}, not images. "
                "Point `image_column` at the column of pictures (an Image feature), or for a CSV, at the column "
                "of image file paths."
            )
    else:
        found = [c for c in columns if isinstance(features[c], Image)]
        if len(found) != 1:
            raise UserError(
                f"{'No' if not found else 'Several'} image column{'s' if found else ''} in {where} "
                f"({found or 'none'} among {columns}). Set `image_column` to the one to train on."
            )
        image_column = found[0]

    if label_column is not None:
        if label_column not in features:
            raise UserError(
                f"label_column={label_column!r} is not a column of {where}; the columns are {columns}. "
                "Set `label_column` to one of them."
            )
        return image_column, label_column
    class_labels = [c for c in columns if isinstance(features[c], ClassLabel)]
    if len(class_labels) == 1:
        return image_column, class_labels[0]
    named = [c for c in columns if c.lower() in LABEL_COLUMN_NAMES and c != image_column]
    candidates = class_labels or named
    if len(candidates) != 1:
        raise UserError(
            f"{'No' if not candidates else 'Several'} label column{'s' if candidates else ''} in {where} "
            f"({candidates or 'none'} among {columns}). Set `label_column` to the column holding the class."
        )
    return image_column, candidates[0]


def _encode_labels(splits, label_column: str, where: str):
    """Make the label column a `ClassLabel` shared by all splits (sorted names for strings and ints)."""
    from datasets import ClassLabel, Value

    feature = next(iter(splits.values())).features[label_column]
    if isinstance(feature, ClassLabel):
        return splits
    if isinstance(feature, Value) and feature.dtype.startswith("float"):
        raise UserError(
            f"Label column `{label_column}` of {where} holds floating-point numbers ({feature.dtype}): that looks "
            "like a regression target, not classes. Use a column of class names or integer class ids, or set "
            "`label_column` to the right column."
        )
    if not isinstance(feature, Value) or not (feature.dtype in STRING_DTYPES or "int" in feature.dtype):
        raise UserError(
            f"Label column `{label_column}` of {where} holds {feature!r}; labels must be class names (strings) or "
            "integer class ids. Set `label_column` to the right column."
        )
    for split, dataset in splits.items():
        missing = dataset.filter(lambda v: v is None, input_columns=label_column).num_rows
        if missing:
            raise UserError(
                f"{missing} row(s) of the {split} split of {where} have no value in label column "
                f"`{label_column}`. Fill them in or remove those rows."
            )
    values = {v for d in splits.values() for v in d.unique(label_column)}
    padded = sorted(v for v in values if isinstance(v, str) and v != v.strip())
    if padded:
        # ` grass` and `grass` are one class: spaces around a name in a table are never meant.
        logger.info("Labels stripped of surrounding spaces: %s", ", ".join(map(repr, padded[:10])))
        splits = splits.map(
            lambda batch: {label_column: [v.strip() for v in batch[label_column]]},
            batched=True,
            desc="Stripping spaces around labels",
        )
        values = {v.strip() for v in values}
    if "int" in feature.dtype or all(_INTEGER.fullmatch(v) for v in values):
        return _encode_class_ids(splits, label_column, values)
    return splits.class_encode_column(label_column)


_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


def _encode_class_ids(splits, label_column: str, values):
    """Class ids (integers, or strings of digits) as a `ClassLabel` whose names are the ids, sorted by number
    ("2" before "10", -1 first). The stored values become each id's position among the names: ids 1..K, with
    gaps or negative are not positions themselves, and casting them unchanged would mislabel every row."""
    from datasets import ClassLabel, DatasetDict, Features

    ordered = sorted(values, key=lambda v: (int(v), str(v)))
    names = [str(v).strip() for v in ordered]
    if len({int(v) for v in ordered}) < len(ordered):
        raise UserError(
            f"Label column `{label_column}` writes the same class id in several ways ({sorted(values, key=str)}). "
            "Write each class id one way."
        )
    position = {v: i for i, v in enumerate(ordered)}

    def encode(batch):
        return {label_column: [position[v] for v in batch]}

    encoded = {}
    for split, dataset in splits.items():
        features = Features({**dataset.features, label_column: ClassLabel(names=names)})
        encoded[split] = dataset.map(
            encode, input_columns=label_column, batched=True, features=features, desc="Encoding class ids"
        )
    return DatasetDict(encoded)


# --------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------
def _pick_split(raw, wanted: str | None, defaults: tuple[str, ...], kind: str) -> str | None:
    if wanted is not None:
        if wanted not in raw:
            raise UserError(
                f"{kind}_split={wanted!r} is not a split of the dataset; its splits are {list(raw)}. "
                f"Set `{kind}_split` to one of them."
            )
        return wanted
    return next((name for name in defaults if name in raw), None)


def _stratified_holdout(dataset, fraction: float, label_column: str, seed: int, name: str):
    import numpy as np

    counts = np.bincount(dataset[label_column], minlength=dataset.features[label_column].num_classes)
    present = counts[counts > 0]
    n_holdout = round(len(dataset) * fraction)
    if n_holdout < 1:
        raise UserError(
            f"Holding out {fraction:.0%} of {len(dataset)} training images as {name} leaves no {name} images. "
            f"Raise the fraction, add data, or give a {name} split."
        )
    stratify = present.min() >= 2 and n_holdout >= len(present)
    if not stratify:
        logger.warning(
            "The %s split is drawn at random, not stratified: some class has fewer than 2 images or the %s "
            "split is smaller than the number of classes.",
            name,
            name,
        )
    parts = dataset.train_test_split(
        test_size=fraction, seed=seed, stratify_by_column=label_column if stratify else None
    )
    return parts["train"], parts["test"], stratify


def _subset(dataset, size: int | None, label_column: str, seed: int, name: str, report: dict):
    """`size` rows of `dataset` (max_*_samples), drawn with `seed`, stratified by class where possible."""
    if size is None or size >= len(dataset):
        return dataset
    if size < 1:
        raise UserError(f"max_*_samples={size} for the {name} split must be at least 1.")
    counts = Counter(dataset[label_column])
    # Stratified needs at least one row per class on each side of the cut, and two rows in every class.
    stratify = len(counts) <= min(size, len(dataset) - size) and min(counts.values()) >= 2
    if stratify:
        kept = dataset.train_test_split(train_size=size, seed=seed, stratify_by_column=label_column)["train"]
    else:
        logger.warning(
            "The %d-image subset of the %s split is drawn at random, not stratified: it is smaller than the "
            "number of classes, or some class has a single image.",
            size,
            name,
        )
        kept = dataset.shuffle(seed=seed).select(range(size))
    report.setdefault(name, {})["subset"] = (
        f"{size} of {len(dataset)} ({'stratified' if stratify else 'random'})"
    )
    return kept


def make_splits(raw, args: DataArguments, label_column: str, seed: int):
    """Return a DatasetDict with train / validation / (test), and a report of how each split was made."""
    from datasets import DatasetDict

    if args.train_split not in raw:
        raise UserError(
            f"train_split={args.train_split!r} is not a split of the dataset; its splits are {list(raw)}. "
            "Set `train_split` to the one to train on."
        )
    validation = _pick_split(raw, args.validation_split, VALIDATION_SPLIT_NAMES, "validation")
    test = _pick_split(raw, args.test_split, ("test",), "test")
    train = raw[args.train_split]
    report: dict[str, Any] = {}

    if test is None and args.train_test_split > 0:
        train, test_ds, stratified = _stratified_holdout(
            train, args.train_test_split, label_column, seed, "test"
        )
        report["test"] = {"source": f"{args.train_test_split:.0%} of train", "stratified": stratified}
    else:
        test_ds = raw[test] if test is not None else None
        if test is not None:
            report["test"] = {"source": f"split `{test}`"}
    if validation is None:
        if args.train_val_split <= 0:
            raise UserError(
                "There is no validation split and train_val_split is 0. Give a validation split "
                "(validation_split, validation_dir or validation_file) or set train_val_split, e.g. 0.15."
            )
        # Both fractions are of the original train split, whichever is carved first.
        carved_test = "test" in report and report["test"]["source"].endswith("of train")
        fraction = (
            args.train_val_split / (1.0 - args.train_test_split) if carved_test else args.train_val_split
        )
        train, val_ds, stratified = _stratified_holdout(train, fraction, label_column, seed, "validation")
        report["validation"] = {"source": f"{args.train_val_split:.0%} of train", "stratified": stratified}
    else:
        val_ds = raw[validation]
        report["validation"] = {"source": f"split `{validation}`"}
    report["train"] = {"source": f"split `{args.train_split}`"}

    # Subsets are seeded and stratified: image folders list their files class by class, so the first N rows
    # would hold only the first classes.
    train = _subset(train, args.max_train_samples, label_column, seed, "train", report)
    val_ds = _subset(val_ds, args.max_eval_samples, label_column, seed, "validation", report)
    if test_ds is not None:
        test_ds = _subset(test_ds, args.max_eval_samples, label_column, seed, "test", report)
    splits = {"train": train, "validation": val_ds}
    if test_ds is not None:
        splits["test"] = test_ds
    return DatasetDict(splits), report


# --------------------------------------------------------------------------------------------------------
# Image hygiene
# --------------------------------------------------------------------------------------------------------
# Bumped whenever what the scan stores changes (including anything `images.downscaled_copy` does: `datasets`
# fingerprints the map function by name, not by what it calls), so that older cached scans are not reused.
SCAN_VERSION = 4  # 4: 16-bit pictures scaled by bit depth


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The scan's thread pool, set only while `find_bad_images` runs (not a map argument: it would enter the cache
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


def _files_signature(dataset, image_column: str) -> str | None:
    """A digest of (path, modification time, size) of the files that path-only image values point to.

    `datasets` fingerprints a table of paths (CSV / JSON lines) by the table alone, so without this a picture
    edited in place would keep its stale downscaled copy and its stale check result. Image folders are covered
    by `datasets` already; this costs one `stat` per file.
    """
    import hashlib

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
        mapper(lambda value: check_image(value, cover, interpolation, lossless, exact), batch[image_column])
    )
    out = {SCAN_PROBLEM_COLUMN: [problem for problem, _ in checked]}
    if cover is not None:
        out[image_column] = [value for _, value in checked]
        out[SCAN_COPY_COLUMN] = [
            new is not old for (_, new), old in zip(checked, batch[image_column], strict=True)
        ]
    return out


def _any_may_downscale(dataset, image_column: str, cover, exact: bool) -> bool:
    """Whether any picture of `dataset` is large enough for a copy, judged from file headers; stops at the first."""
    for batch in dataset.select_columns([image_column]).iter(batch_size=256):
        if any(may_downscale(value, cover, exact) for value in batch[image_column]):
            return True
    return False


def find_bad_images(splits, image_column: str, downscale: DecodeSizes | None = None):
    """Decode every image once before training; drop the unreadable ones and return them in a list.

    With `downscale`, the same pass stores each picture that is much larger than the transforms need as an
    upright RGB copy that just covers `downscale.cover(split)`, so that every epoch decodes a small picture
    instead of the original (a 12-megapixel photo bound for a 224-pixel model: a tenth of the pixels). Copies
    of evaluation splits are lossless; training copies are quality-95 JPEGs (`images.downscaled_copy`).
    In-memory datasets get no copies (nothing of theirs is cached). The scan is a `datasets.map`, so for
    on-disk datasets its result, copies included, is cached by fingerprint (input data, the listed files' times
    and sizes, sizes, filter, SCAN_VERSION): a second run over the same data decodes nothing, and a run with
    another checkpoint size or crop scale, or after a picture changed, makes new ones.
    """
    from datasets import DatasetDict, Features, Image, Value

    bad: list[dict[str, Any]] = []
    cleaned = {}
    for name, dataset in splits.items():
        # In-memory datasets are not cached: copies would only add to the memory the data already takes.
        cover = downscale.cover(name) if downscale is not None and dataset.cache_files else None
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
        with _scan_pool():
            scanned = undecoded.map(
                _scan_batch,
                batched=True,
                batch_size=64,
                fn_kwargs={
                    "image_column": image_column,
                    "cover": tuple(cover) if cover is not None else None,
                    "interpolation": downscale.interpolation if downscale is not None else "bilinear",
                    # Evaluation sees exactly the pixels it would see without copies; training copies may be lossy.
                    "lossless": downscale is None or downscale.lossless(name),
                    "exact": downscale is not None and downscale.exact(name),
                    "version": SCAN_VERSION,
                    "files": _files_signature(undecoded, image_column),
                },
                features=features,
                # A check alone writes only its findings, not another copy of the images (for datasets that
                # embed their image bytes, that would be the whole dataset again).
                remove_columns=None if cover is not None else [image_column],
                desc=f"{'Checking and downscaling' if cover else 'Checking'} {name} images",
            )
        problems = scanned[SCAN_PROBLEM_COLUMN]
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
            dataset = scanned.remove_columns([SCAN_PROBLEM_COLUMN, SCAN_COPY_COLUMN]).cast_column(
                image_column, dataset.features[image_column]
            )
        if bad_rows:
            keep = sorted(set(range(len(dataset))) - set(bad_rows))
            dataset = dataset.select(keep)
        cleaned[name] = dataset
    return DatasetDict(cleaned), bad


# --------------------------------------------------------------------------------------------------------
# Splits that share pictures
# --------------------------------------------------------------------------------------------------------
def _picture_digests(dataset, image_column: str) -> list[str | None]:
    """A content digest of every picture (its bytes, or its file's bytes); None for a missing file."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc

    def digest(item):
        data, path = item
        try:
            if data is None:
                with open(path, "rb") as handle:
                    data = handle.read()
            return hashlib.blake2b(data).hexdigest()
        except (OSError, TypeError):
            return None

    values = dataset.select_columns([image_column]).with_format("arrow")
    digests: list[str | None] = []
    with ThreadPoolExecutor(max_workers=min(16, usable_cores())) as pool:
        for table in values.iter(batch_size=1024):
            column = table.column(image_column)
            data, paths = (pc.struct_field(column, key).to_pylist() for key in ("bytes", "path"))
            digests.extend(pool.map(digest, zip(data, paths, strict=True)))
    return digests


def check_split_overlap(splits, image_column: str, report: dict[str, Any]) -> None:
    """Pictures of validation / test that are also in an earlier split (the same file, or identical contents):
    counted into `report` (data_splits.json) and the log; a split made only of such pictures is an error, since
    its metrics would measure pictures the model trained on."""
    from datasets import Image

    seen: dict[str, set[str]] = {}
    for name, dataset in splits.items():
        digests = _picture_digests(dataset.cast_column(image_column, Image(decode=False)), image_column)
        known = [d for d in digests if d is not None]
        overlap = {earlier: sum(d in keys for d in known) for earlier, keys in seen.items()}
        if overlap:
            report.setdefault(name, {})["overlap"] = overlap
        shared = sum(any(d in keys for keys in seen.values()) for d in known)
        seen[name] = set(known)
        if not shared:
            continue
        with_which = ", ".join(f"{count} with {earlier}" for earlier, count in overlap.items() if count)
        if shared == len(digests):
            raise UserError(
                f"Every picture of the {name} split ({shared}) is also in another split ({with_which}): the same "
                f"files or identical contents, e.g. train_dir and {name}_dir pointing at the same folder. Its metrics "
                f"would measure pictures the model trained on. Give a {name} split with other pictures."
            )
        logger.warning(
            "%d of %d %s picture(s) are also in another split (%s; the same file or identical contents): the %s "
            "metrics partly measure pictures seen before. Remove the duplicates for a clean measure.",
            shared,
            len(digests),
            name,
            with_which,
            name,
        )


def _source_roots(args: DataArguments) -> list[str]:
    folders = [getattr(args, f"{split}_dir") for split in ("train", "validation", "test")]
    tables = [getattr(args, f"{split}_file") for split in ("train", "validation", "test")]
    roots = [Path(f).resolve() for f in folders if f] + [Path(f).resolve().parent for f in tables if f]
    return [str(root) for root in roots]


# --------------------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------------------
def _check_labels(splits, label_column: str, labels: list[str]) -> None:
    import numpy as np

    by_case: dict[str, list[str]] = {}
    for name in labels:
        by_case.setdefault(str(name).casefold(), []).append(str(name))
    for names in by_case.values():
        if len(names) > 1:
            logger.warning(
                "Labels %s differ only by case, so they are separate classes. If they are one class, give them one "
                "name in the data.",
                " / ".join(map(repr, names)),
            )

    train_counts = np.bincount(splits["train"][label_column], minlength=len(labels))
    if len(labels) < 2 or (train_counts > 0).sum() < 2:
        raise UserError(
            f"The training data has {int((train_counts > 0).sum())} class(es) ({labels}); a classifier needs at "
            "least two. Check `label_column` and that the image folder has one sub-folder per class."
        )
    for name in ("validation", "test"):
        if name not in splits or len(splits[name]) == 0:
            continue
        counts = np.bincount(splits[name][label_column], minlength=len(labels))
        unseen = [labels[i] for i in np.flatnonzero((counts > 0) & (train_counts == 0))]
        if unseen:
            raise UserError(
                f"Class(es) {unseen} appear in the {name} split but never in train, so the model cannot learn "
                f"them. Add training images for them or remove them from {name}."
            )


def prepare_data(
    args: DataArguments,
    seed: int,
    cache_dir: str | None = None,
    dataset=None,
    downscale: DecodeSizes | None = None,
) -> PreparedData:
    """Load, detect columns, encode labels, split and clean: the data a run trains and evaluates on.

    `downscale` (the sizes the run's transforms need): store downscaled copies of large pictures while
    checking them (`find_bad_images`).
    """
    from datasets import DatasetDict

    raw = load_raw_splits(args, cache_dir=cache_dir, dataset=dataset)
    where = args.dataset_name or args.train_dir or args.train_file or "the given dataset"
    first = raw[args.train_split] if args.train_split in raw else next(iter(raw.values()))
    image_column, label_column = detect_columns(first.features, args.image_column, args.label_column, where)
    extra = [c for c in first.column_names if c not in (image_column, label_column)]
    raw = raw.remove_columns(extra) if extra else raw
    raw = _encode_labels(raw, label_column, where)
    labels = list(next(iter(raw.values())).features[label_column].names)
    # The row of the user's file, so that bad_images.json names it whichever split the picture ends up in.
    raw = DatasetDict({name: d.add_column(SOURCE_ROW_COLUMN, list(range(len(d)))) for name, d in raw.items()})

    splits, report = make_splits(raw, args, label_column, seed)
    check_split_overlap(splits, image_column, report)
    rows = {name: d[SOURCE_ROW_COLUMN] for name, d in splits.items()}
    splits, bad = find_bad_images(splits, image_column, downscale)
    splits = splits.remove_columns(SOURCE_ROW_COLUMN)
    found = PreparedData(splits, image_column, label_column, labels, bad, report, roots=_source_roots(args))
    for entry in bad:
        # Carved validation / test rows are rows of the train source (`report[split]["source"]`).
        entry["index"] = rows[entry["split"]][entry["index"]]
        name = found.image_name(entry["image"])  # PIL's message names the file too
        entry["problem"] = entry["problem"].replace(entry["image"], name)
        entry["image"] = name
    if bad:
        listing = "; ".join(f"{b['image']} ({b['split']}): {b['problem']}" for b in bad[:5])
        if args.on_bad_image == "error":
            raise UserError(
                f"{len(bad)} unreadable image(s) found before training: {listing}"
                + (" ..." if len(bad) > 5 else "")
                + ". Fix or remove them, or set on_bad_image=skip to train without them."
            )
        logger.warning(
            "Skipping %d unreadable image(s): %s%s", len(bad), listing, " ..." if len(bad) > 5 else ""
        )
    for name, dataset in splits.items():
        if len(dataset) == 0:
            raise UserError(
                f"The {name} split is empty after removing {sum(b['split'] == name for b in bad)} unreadable "
                "image(s) and applying max_*_samples. Check the data source."
            )
    _check_labels(splits, label_column, labels)
    for name, dataset in splits.items():
        report.setdefault(name, {})["size"] = len(dataset)
    logger.info(
        "Data: %d classes; %s",
        len(labels),
        ", ".join(f"{name} {len(d)} ({report[name]['source']})" for name, d in splits.items()),
    )
    return found
