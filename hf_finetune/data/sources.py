"""Data sources: a Hub dataset, a local image folder per split, a CSV / JSON-lines file per split, or an
in-memory `Dataset` / `DatasetDict`, each loaded as a `DatasetDict` keyed by the source's own split names.

Pixels are never materialised here: the image column holds paths or bytes until `hf_finetune.data.scan` checks
them and `hf_finetune.data.transforms` attaches the lazy transforms.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hf_finetune.config import DataArguments
from hf_finetune.data.folders import load_image_folders
from hf_finetune.errors import UserError
from hf_finetune.hub import check_hub_repo, offline, warn_if_local_shadows

logger = logging.getLogger(__name__)

PATH_COLUMN_NAMES = ("image", "image_path", "path", "file", "filename", "file_name", "filepath", "img")
STRING_DTYPES = ("string", "large_string")


def _split_files(args: DataArguments, kind: str) -> dict[str, str]:
    return {
        split: getattr(args, f"{split}_{kind}")
        for split in ("train", "validation", "test")
        if getattr(args, f"{split}_{kind}") is not None
    }


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
        return load_image_folders(folders, cache_dir)
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
