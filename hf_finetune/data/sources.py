"""Data sources: a Hub dataset, a local image folder per split, a CSV / JSON-lines file per split, or an
in-memory `Dataset` / `DatasetDict`, each loaded as a `DatasetDict` keyed by the source's own split names.

Pixels are never materialised here: the image column holds paths or bytes until `hf_finetune.data.scan` checks
them and `hf_finetune.data.transforms` attaches the lazy transforms.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hf_finetune.config import DataArguments
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
PATH_COLUMN_NAMES = ("image", "image_path", "path", "file", "filename", "file_name", "filepath", "img")
STRING_DTYPES = ("string", "large_string")


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


def source_roots(args: DataArguments) -> list[str]:
    """The data source's folders (the image folders, the tables' folders): files that can be published name
    pictures relative to them (`PreparedData.image_name`)."""
    folders, tables = _split_files(args, "dir"), _split_files(args, "file")
    return [str(Path(f).resolve()) for f in folders.values()] + [
        str(Path(f).resolve().parent) for f in tables.values()
    ]
