"""Labels: which column holds the pictures and which the classes; one `ClassLabel` shared by every split
(class names, or integer class ids in numeric order); the checks a label set must pass before training."""

from __future__ import annotations

import logging
import re

from hf_finetune.data.sources import STRING_DTYPES
from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

LABEL_COLUMN_NAMES = ("label", "labels", "class", "category", "target", "fine_label")


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
    # A Hub multi-label dataset's label column is a Sequence(ClassLabel).
    class_labels = [
        c
        for c in columns
        if isinstance(features[c], ClassLabel)
        or isinstance(getattr(features[c], "feature", None), ClassLabel)
    ]
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


def encode_labels(splits, label_column: str, where: str):
    """Make the label column one `ClassLabel` shared by all splits: class names sorted, integer class ids (or
    strings of digits) in numeric order."""
    from datasets import ClassLabel, DatasetDict, Features, Value

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
        values = {v.strip() for v in values}
    names = class_names(values, label_column, integer="int" in feature.dtype)
    # One pass per split: each label as its text, stripped, which the ClassLabel feature then encodes by name,
    # so every split gets the same ids. Not `DatasetDict.class_encode_column` (datasets 5.2): it numbers each
    # split's classes on its own (a validation file without one of the classes would get other ids for the
    # rest) and sorts class ids as text ("10" before "2"). Nor a cast of integer ids straight to a ClassLabel:
    # it keeps the ids as positions, and ids 1..K, with gaps or negative, would mislabel every row.
    target = ClassLabel(names=names)

    def as_names(batch):
        return {label_column: [str(v).strip() for v in batch]}

    return DatasetDict(
        {
            split: dataset.map(
                as_names,
                input_columns=label_column,
                batched=True,
                features=Features({**dataset.features, label_column: target}),
                desc="Encoding labels",
            )
            for split, dataset in splits.items()
        }
    )


_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


def class_names(values, label_column: str, integer: bool = False) -> list[str]:
    """The class names for a set of label values: integer class ids (or strings of digits) in numeric order,
    else names sorted."""
    if integer or all(_INTEGER.fullmatch(str(v)) for v in values):
        return _class_id_names(values, label_column)
    return sorted(values)


def _class_id_names(values, label_column: str) -> list[str]:
    """Class ids (integers, or strings of digits) as class names sorted by number ("2" before "10", -1 first)."""
    ordered = sorted(values, key=lambda v: (int(v), str(v)))
    if len({int(v) for v in ordered}) < len(ordered):
        raise UserError(
            f"Label column `{label_column}` writes the same class id in several ways ({sorted(values, key=str)}). "
            "Write each class id one way."
        )
    return [str(v).strip() for v in ordered]


def check_labels(splits, label_column: str, labels: list[str]) -> None:
    """Names that differ only by case (a warning); at least two classes in train; no class that only the
    validation or test split has (the model could not learn it)."""
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
