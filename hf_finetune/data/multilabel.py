"""Multi-label data: a set of labels per picture, held as one `Sequence(ClassLabel)` feature shared by every
split (label names sorted; integer ids in numeric order), detected from the label column, and its checks.

Rules for the label column (README, "Multi-label classification"):
- a list-valued column (JSON lines, a Hub `Sequence(ClassLabel)` / `Sequence(Value)`) is multi-label; so is a
  text column whose values hold `label_separator` (`3;7`), or any label column with `task: multi_label`;
- a row with no value (an empty CSV cell, `null`) is an error; an empty list (`[]`, or an empty text between
  separators) is a picture that shows none of the labels: it is kept, counted in the log, and trains as an
  all-negative example;
- a label that only validation or test holds is an error (the model could not learn it).
"""

from __future__ import annotations

import logging

from hf_finetune.data.sources import STRING_DTYPES
from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)


def is_multi_label_feature(feature) -> bool:
    """A `Sequence(ClassLabel)` feature: the encoded form of multi-label data."""
    from datasets import ClassLabel

    return isinstance(getattr(feature, "feature", None), ClassLabel)


def _is_list_feature(feature) -> bool:
    return hasattr(feature, "feature") and not isinstance(feature, dict)


def wants_multi_label(splits, label_column: str, task: str, separator: str, where: str) -> bool:
    """Whether the label column is multi-label: `task` when it says so, else a list-valued column, or a text
    column whose values hold `separator`."""
    feature = next(iter(splits.values())).features[label_column]
    listed = _is_list_feature(feature)
    if task == "single_label":
        if listed:
            raise UserError(
                f"Label column `{label_column}` of {where} holds lists of labels ({feature!r}) but task is "
                "`single_label`. Set `task: multi_label` (or `auto`), or point `label_column` at a column with one "
                "class per picture."
            )
        return False
    if listed or task == "multi_label":
        return True
    if not (hasattr(feature, "dtype") and feature.dtype in STRING_DTYPES):
        return False
    joined = [
        v for d in splits.values() for v in d.unique(label_column) if isinstance(v, str) and separator in v
    ]
    if joined:
        logger.info(
            "Multi-label data: %d label value(s) of `%s` hold the label_separator %r (e.g. %r); each row's labels "
            "are the parts between separators. Set `task: single_label` if these are single class names.",
            len(joined),
            label_column,
            separator,
            joined[0],
        )
    return bool(joined)


def _row_labels(value, separator: str) -> list[str]:
    parts = value.split(separator) if isinstance(value, str) else [str(v) for v in value]
    return sorted({p.strip() for p in parts if p.strip()})


def encode_multi_labels(splits, label_column: str, separator: str, where: str):
    """Make the label column one `Sequence(ClassLabel)` shared by every split; returns (splits, names)."""
    from datasets import ClassLabel, DatasetDict, Sequence

    from hf_finetune.data.labels import class_names

    for split, dataset in splits.items():
        empty = dataset.filter(
            lambda v: v is None or (not isinstance(v, str) and any(x is None for x in v)),
            input_columns=label_column,
        ).num_rows
        if empty:
            raise UserError(
                f"{empty} row(s) of the {split} split of {where} have no value in label column `{label_column}` "
                "(or a null inside a list). Give each row its labels (several separated by "
                f"{separator!r}, e.g. `cat{separator}dog`); for a picture that shows none of the labels write an "
                "empty list `[]` in a JSON-lines file, or remove those rows."
            )
    feature = next(iter(splits.values())).features[label_column]
    # Already a Sequence(ClassLabel) (a Hub dataset): its ids are read back as names, then sorted like any.
    names_of = feature.feature.names if is_multi_label_feature(feature) else None

    def read(value):
        return _row_labels(value if names_of is None else [names_of[i] for i in value], separator)

    rows = {name: [read(v) for v in d[label_column]] for name, d in splits.items()}
    values = {label for per_split in rows.values() for labels in per_split for label in labels}
    if not values:
        raise UserError(
            f"Label column `{label_column}` of {where} holds no label at all. Check `label_column` and "
            f"`label_separator` ({separator!r})."
        )
    names = class_names(values, label_column)
    ids = {name: i for i, name in enumerate(names)}
    target = Sequence(ClassLabel(names=names))
    encoded = {}
    for name, dataset in splits.items():
        unlabelled = sum(not labels for labels in rows[name])
        if unlabelled:
            logger.info(
                "%d picture(s) of the %s split have an empty label list: they train and count as showing none "
                "of the labels.",
                unlabelled,
                name,
            )
        # Integer class ids are written back as their names ("07" and "7" are one label): ids by name lookup.
        column = [[ids[label] for label in labels] for labels in rows[name]]
        encoded[name] = dataset.remove_columns(label_column).add_column(label_column, column, feature=target)
    return DatasetDict(encoded), names


def label_matrix(label_lists, num_labels: int):
    """Lists of label ids -> a (rows, labels) 0/1 array."""
    import numpy as np

    matrix = np.zeros((len(label_lists), num_labels), dtype=np.int8)
    for row, ids in enumerate(label_lists):
        matrix[row, list(ids)] = 1
    return matrix


def check_multi_labels(splits, label_column: str, labels: list[str]) -> None:
    """At least two labels, each with a training picture; no label that only validation or test holds."""
    train = label_matrix(splits["train"][label_column], len(labels)).sum(0)
    if len(labels) < 2:
        raise UserError(
            f"The data has {len(labels)} label ({labels}); multi-label classification needs at least two. For one "
            "label, train a two-class single-label classifier (the label, and not)."
        )
    for name in ("validation", "test"):
        if name not in splits or len(splits[name]) == 0:
            continue
        counts = label_matrix(splits[name][label_column], len(labels)).sum(0)
        unseen = [labels[i] for i in range(len(labels)) if counts[i] and not train[i]]
        if unseen:
            raise UserError(
                f"Label(s) {unseen} appear in the {name} split but in no training picture, so the model cannot "
                f"learn them. Add training pictures with them or remove them from {name}."
            )
