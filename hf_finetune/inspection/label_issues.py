"""Likely label errors: out-of-fold probabilities of the probe's classifier on train, then cleanlab.

Each training picture is predicted by a classifier fitted without it (stratified k-fold cross-validation on
train, with the regularisation the probe chose on the validation split), so a mislabelled picture is judged by
what the other pictures of its class look like, not by a classifier that has memorised its wrong label. Those
probabilities go to `cleanlab.filter.find_label_issues` (confident learning), which returns the suspects
ranked by self-confidence: the lowest predicted probability of the given label first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class LabelIssues:
    """Out-of-fold probabilities of train and the suspects cleanlab found in them (ranked, most likely first)."""

    probabilities: np.ndarray  # (train rows, classes), each row from a classifier that did not see it
    ranked: list[int]  # training rows, most likely label error first
    quality: np.ndarray  # cleanlab's label quality score per training row (low: likely wrong)
    folds: int
    skipped: str | None = None  # why nothing was looked for, when nothing was
    fold_seconds: list[float] = field(default_factory=list)


def find_label_issues(
    spec, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_labels: int, probe_args,
    chosen: dict[str, Any], folds: int = 5, seed: int = 0, start=None,
) -> LabelIssues:  # fmt: skip
    """Suspected label errors of the training rows (`x`, `y`), ranked; see the module docstring. `start`: the
    probe's fitted predictor, each fold's starting point (see `out_of_fold_probabilities`)."""
    import numpy as np
    from cleanlab.filter import find_label_issues as cleanlab_find
    from cleanlab.rank import get_label_quality_scores

    counts = np.bincount(y, minlength=num_labels)
    present = counts[counts > 0]
    usable = int(min(folds, present.min()))
    if usable < 2:
        small = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))]
        why = (
            f"class id(s) {small} have a single training picture, so no fold can predict it without having seen "
            "it; add pictures to those classes to have their labels checked"
        )
        logger.warning("Label issues: not looked for: %s.", why)
        empty = np.zeros((len(y), num_labels))
        return LabelIssues(empty, [], np.ones(len(y)), 0, skipped=why)
    if usable < folds:
        logger.warning(
            "Label issues: %d folds instead of label_issue_folds=%d, as the smallest class has %d training "
            "pictures (each fold needs one of each).",
            usable,
            folds,
            usable,
        )
    from hf_finetune.probe.out_of_fold import out_of_fold_probabilities

    probabilities, seconds = out_of_fold_probabilities(
        spec, x, y, x_val, y_val, num_labels, probe_args, chosen, usable, seed, start,
        desc="Label issues: cross-validation",
    )  # fmt: skip
    # Classes absent from train have no column cleanlab could estimate: it sees only the classes present.
    columns = np.flatnonzero(counts > 0)
    remap = np.full(num_labels, -1)
    remap[columns] = np.arange(len(columns))
    probs = probabilities[:, columns]
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
    given = remap[y]
    # cleanlab's worker processes cost more than they save below tens of thousands of rows (0.25 s against 0.04 s
    # for 1,267 rows, measured with cleanlab 2.9).
    ranked = cleanlab_find(
        labels=given,
        pred_probs=probs,
        return_indices_ranked_by="self_confidence",
        n_jobs=1 if len(y) < 50_000 else None,
    )
    quality = get_label_quality_scores(given, probs, method="self_confidence")
    logger.info(
        "Label issues: %d of %d training pictures suspected (out-of-fold %s, %d folds, then cleanlab).",
        len(ranked),
        len(y),
        spec.name,
        usable,
    )
    return LabelIssues(probabilities, [int(i) for i in ranked], quality, usable, fold_seconds=seconds)
