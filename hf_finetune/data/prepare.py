"""The data a run trains and evaluates on, in one call: load the source, detect the columns, encode the labels,
make the splits, check for pictures the splits share, scan the images, check the labels.

Each step lives in its own module (`sources`, `labels`, `splits`, `scan`); this one only puts them in order
and says what happened, so a run enters each of them once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_finetune.config import DataArguments
from hf_finetune.data.images import DecodeSizes, image_location
from hf_finetune.data.labels import check_labels, detect_columns, encode_labels
from hf_finetune.data.multilabel import check_multi_labels, encode_multi_labels, wants_multi_label
from hf_finetune.data.scan import scan_images
from hf_finetune.data.sources import load_raw_splits, source_roots
from hf_finetune.data.splits import check_split_overlap, make_splits
from hf_finetune.errors import UserError
from hf_finetune.time_budget import DATA_PHASE, IMAGE_CHECK, timed

logger = logging.getLogger(__name__)

SOURCE_ROW_COLUMN = "__source_row__"


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
    # Per split, the content digest of each row (rows as in `splits`), from the image check's one read.
    digests: dict[str, list[str | None]] = field(default_factory=dict)
    # A set of labels per picture (`Sequence(ClassLabel)` label column): sigmoid scores, BCE, thresholds.
    multi_label: bool = False

    def image_name(self, value: Any) -> str:
        """How a picture is named in files that can be published: its path relative to the data source (the
        image folder, or the table's folder), never an absolute path of this machine."""
        location = image_location(value)
        if not os.path.isabs(location):
            return location
        # Plain string prefixes (what Path.is_relative_to compares, lexically), as this runs once per picture.
        for root in sorted(self.roots, key=len, reverse=True):
            prefix = root.rstrip(os.sep) + os.sep
            if location.startswith(prefix):
                return Path(location[len(prefix) :]).as_posix()
        return os.path.basename(location)  # e.g. a file in the datasets cache


def report_bad_images(found: PreparedData, rows: dict[str, list[int]], on_bad_image: str) -> None:
    """Name each unreadable picture as published files do, with its row in the source split (`rows`); then
    stop the run (`on_bad_image: error`) or log how many are skipped."""
    bad = found.bad_images
    for entry in bad:
        # Carved validation / test rows are rows of the train source (`report[split]["source"]`).
        entry["index"] = rows[entry["split"]][entry["index"]]
        name = found.image_name(entry["image"])  # PIL's message names the file too
        entry["problem"] = entry["problem"].replace(entry["image"], name)
        entry["image"] = name
    if not bad:
        return
    listing = "; ".join(f"{b['image']} ({b['split']}): {b['problem']}" for b in bad[:5])
    if on_bad_image == "error":
        raise UserError(
            f"{len(bad)} unreadable image(s) found before training: {listing}"
            + (" ..." if len(bad) > 5 else "")
            + ". Fix or remove them, or set on_bad_image=skip to train without them."
        )
    logger.warning("Skipping %d unreadable image(s): %s%s", len(bad), listing, " ..." if len(bad) > 5 else "")


def prepare_data(
    args: DataArguments,
    seed: int,
    cache_dir: str | None = None,
    dataset=None,
    downscale: DecodeSizes | None = None,
    copy_splits: Collection[str] | None = None,
) -> PreparedData:
    """Load, detect columns, encode labels, split and clean: the data a run trains and evaluates on.

    `downscale` (the sizes the run's transforms need): store downscaled copies of large pictures while
    checking them (`scan.scan_images`), in the splits named in `copy_splits` (None: every split).
    """
    from datasets import DatasetDict

    raw = load_raw_splits(args, cache_dir=cache_dir, dataset=dataset)
    where = args.dataset_name or args.train_dir or args.train_file or "the given dataset"
    first = raw[args.train_split] if args.train_split in raw else next(iter(raw.values()))
    image_column, label_column = detect_columns(first.features, args.image_column, args.label_column, where)
    extra = [c for c in first.column_names if c not in (image_column, label_column)]
    raw = raw.remove_columns(extra) if extra else raw
    multi_label = wants_multi_label(raw, label_column, args.task, args.label_separator, where)
    if multi_label:
        raw, labels = encode_multi_labels(raw, label_column, args.label_separator, where)
    else:
        raw = encode_labels(raw, label_column, where)
        labels = list(next(iter(raw.values())).features[label_column].names)
    # The row of the user's file, so that bad_images.json names it whichever split the picture ends up in.
    raw = DatasetDict({name: d.add_column(SOURCE_ROW_COLUMN, list(range(len(d)))) for name, d in raw.items()})

    splits, report = make_splits(raw, args, label_column, seed)
    rows = {name: d[SOURCE_ROW_COLUMN] for name, d in splits.items()}
    with timed(IMAGE_CHECK, within=DATA_PHASE):  # a phase of its own in the run's time budget
        splits, bad, digests = scan_images(splits, image_column, downscale, copy_splits)
    # Unreadable pictures count here too: a split made only of other splits' pictures stops the run first.
    check_split_overlap(digests, report)
    splits = splits.remove_columns(SOURCE_ROW_COLUMN)
    skipped = {name: {b["index"] for b in bad if b["split"] == name} for name in splits}
    kept_digests = {
        name: [d for i, d in enumerate(values) if i not in skipped[name]] for name, values in digests.items()
    }
    found = PreparedData(
        splits,
        image_column,
        label_column,
        labels,
        bad,
        report,
        roots=source_roots(args),
        digests=kept_digests,
        multi_label=multi_label,
    )
    report_bad_images(found, rows, args.on_bad_image)
    for name, dataset in splits.items():
        if len(dataset) == 0:
            raise UserError(
                f"The {name} split is empty after removing {sum(b['split'] == name for b in bad)} unreadable "
                "image(s) and applying max_*_samples. Check the data source."
            )
    (check_multi_labels if multi_label else check_labels)(splits, label_column, labels)
    for name, dataset in splits.items():
        report.setdefault(name, {})["size"] = len(dataset)
    logger.info(
        "Data: %d %s; %s",
        len(labels),
        "labels (multi-label)" if multi_label else "classes",
        ", ".join(f"{name} {len(d)} ({report[name]['source']})" for name, d in splits.items()),
    )
    return found
