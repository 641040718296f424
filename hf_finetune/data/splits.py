"""Splits: train / validation / test from the source's own splits or carved out of train (stratified, seeded),
`max_*_samples` subsets, and the check for pictures that two splits share (by the content digests the image
scan computes). What each split is made of goes into the report that becomes data_splits.json."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from hf_finetune.config import VALIDATION_SPLIT_NAMES, DataArguments
from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)


def _pick_split(raw, wanted: str | None, defaults: tuple[str, ...], kind: str) -> str | None:
    if wanted is not None:
        if wanted not in raw:
            raise UserError(
                f"{kind}_split={wanted!r} is not a split of the dataset; its splits are {list(raw)}. "
                f"Set `{kind}_split` to one of them."
            )
        return wanted
    return next((name for name in defaults if name in raw), None)


def iterative_stratification(labels, proportions, seed: int):
    """The fold (0 .. len(proportions) - 1) of each row of a (rows, labels) 0/1 matrix, so that each fold gets
    its proportion of the rows and of every label's positives.

    Iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the Stratification of Multi-Label Data",
    ECML PKDD 2011; what scikit-multilearn's and iterative-stratification's splitters implement): take the
    label with the fewest rows left, deal its rows one by one to the fold that wants most of that label (ties:
    the fold that wants most rows, then at random), update what each fold still wants, repeat; rows with no
    label go to the folds that still want most rows. Rare labels are placed first, so every label reaches
    every fold whenever it has enough rows."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    proportions = np.asarray(proportions, dtype=float)
    wanted_rows = proportions * len(labels)
    wanted_labels = np.outer(proportions, labels.sum(0))
    fold = np.full(len(labels), -1)

    def deal(row, best):
        if len(best) > 1:
            best = best[np.isclose(wanted_rows[best], wanted_rows[best].max())]
        chosen = rng.choice(best)
        fold[row] = chosen
        wanted_rows[chosen] -= 1
        wanted_labels[chosen] -= labels[row]

    while True:
        left = labels[fold < 0].sum(0)
        if not left.any():
            break
        rarest = np.flatnonzero(left == left[left > 0].min())
        label = rng.choice(rarest)
        rows = np.flatnonzero((fold < 0) & (labels[:, label] > 0))
        for row in rng.permutation(rows):
            want = wanted_labels[:, label]
            deal(row, np.flatnonzero(np.isclose(want, want.max())))
    for row in rng.permutation(np.flatnonzero(fold < 0)):
        deal(row, np.flatnonzero(np.isclose(wanted_rows, wanted_rows.max())))
    return fold


def _multi_label_parts(dataset, fractions, label_column: str, seed: int):
    """`dataset` cut into len(fractions) parts by iterative stratification; the second part is exactly
    round(len * fractions[1]) rows (rows move from or to the first part at random to make it so)."""
    import numpy as np

    from hf_finetune.data.multilabel import label_matrix

    num_labels = dataset.features[label_column].feature.num_classes
    fold = iterative_stratification(label_matrix(dataset[label_column], num_labels), fractions, seed)
    target = round(len(dataset) * fractions[1])
    second = np.flatnonzero(fold == 1)
    rng = np.random.default_rng(seed)
    if len(second) > target:
        second = np.sort(rng.choice(second, target, replace=False))
    elif len(second) < target:
        extra = rng.choice(np.flatnonzero(fold != 1), target - len(second), replace=False)
        second = np.sort(np.concatenate([second, extra]))
    first = np.setdiff1d(np.arange(len(dataset)), second)
    return dataset.select(first), dataset.select(second)


def labels_missing(dataset, label_column: str, num_labels: int) -> list[int]:
    """Label ids of a multi-label split that none of its rows has."""
    from hf_finetune.data.multilabel import label_matrix

    counts = label_matrix(dataset[label_column], num_labels).sum(0)
    return [i for i in range(num_labels) if not counts[i]]


def _multi_label_holdout(dataset, fraction: float, label_column: str, seed: int, name: str):
    train, held = _multi_label_parts(dataset, [1.0 - fraction, fraction], label_column, seed)
    feature = dataset.features[label_column].feature
    for part_name, part in (("train", train), (name, held)):
        missing = labels_missing(part, label_column, feature.num_classes)
        present = set(labels_missing(dataset, label_column, feature.num_classes))
        missing = [feature.names[i] for i in missing if i not in present]
        if missing:
            logger.warning(
                "Iterative stratification could not give the %s split every label: %s have too few pictures "
                "(%s missing there).",
                part_name,
                ", ".join(missing[:10]),
                len(missing),
            )
    return train, held, "iterative"


def _stratified_holdout(dataset, fraction: float, label_column: str, seed: int, name: str):
    import numpy as np

    from hf_finetune.data.multilabel import is_multi_label_feature

    n_holdout = round(len(dataset) * fraction)
    if n_holdout < 1:
        raise UserError(
            f"Holding out {fraction:.0%} of {len(dataset)} training images as {name} leaves no {name} images. "
            f"Raise the fraction, add data, or give a {name} split."
        )
    if is_multi_label_feature(dataset.features[label_column]):
        return _multi_label_holdout(dataset, fraction, label_column, seed, name)
    counts = np.bincount(dataset[label_column], minlength=dataset.features[label_column].num_classes)
    present = counts[counts > 0]
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
    from hf_finetune.data.multilabel import is_multi_label_feature

    if is_multi_label_feature(dataset.features[label_column]):
        fraction = size / len(dataset)
        _, kept = _multi_label_parts(dataset, [1.0 - fraction, fraction], label_column, seed)
        report.setdefault(name, {})["subset"] = f"{size} of {len(dataset)} (iterative stratification)"
        return kept
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


def check_split_overlap(digests_by_split: dict[str, list[str | None]], report: dict[str, Any]) -> None:
    """Pictures of validation / test that are also in an earlier split (the same file, or identical contents):
    counted into `report` (data_splits.json) and the log; a split made only of such pictures is an error, since
    its metrics would measure pictures the model trained on.

    `digests_by_split`: the content digest of every picture of each split, in split order (train first), as
    the image scan gives them (`scan.scan_images`, which reads each file once for both); None for a file
    that could not be read."""
    seen: dict[str, set[str]] = {}
    for name, digests in digests_by_split.items():
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
