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


def out_of_fold_probabilities(
    spec, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_labels: int, probe_args,
    chosen: dict[str, Any], folds: int, seed: int, start=None,
) -> tuple[np.ndarray, list[float]]:  # fmt: skip
    """Probabilities for every row of `x`, each from `spec` fitted on the other folds with the value `chosen`
    (the probe's own estimator and saved predictor, as `probe.search.refit` builds them).

    `start`: the probe's own linear predictor, fitted on all of train with the same value, from which an
    estimator that can start from given weights (logistic regression) starts each fold (`warm_start`). Each
    fold's objective (the L2-regularised log-loss) is strictly convex, so where lbfgs starts changes only how
    soon it reaches that fold's one optimum, not the optimum: the held-out rows still get the predictions of a
    classifier fitted without them (measured on the digits: the same suspects, in half the time).
    """
    import time
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold
    from tqdm.auto import tqdm

    from hf_finetune.probe.search import FitInputs

    out = np.zeros((len(y), num_labels), dtype=np.float64)
    seconds = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, held_rows in tqdm(
        splitter.split(x, y), total=folds, desc="Label issues: cross-validation", unit="fold", disable=None
    ):
        began = time.perf_counter()
        inputs = FitInputs(x[fit_rows], y[fit_rows], x_val, y_val, num_labels, seed)
        estimator = spec.estimator(inputs, probe_args).set_params(**chosen)
        _start_from(estimator, start, np.unique(y[fit_rows]))
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", ConvergenceWarning
            )  # the value's convergence was reported on train
            estimator.fit(inputs.x_train, inputs.y_train)
        out[held_rows] = spec.predictor(estimator, inputs).probabilities(x[held_rows])
        seconds.append(round(time.perf_counter() - began, 3))
    return out, seconds


def _start_from(estimator, start, classes: np.ndarray) -> None:
    """Give `estimator` the weights of `start` (a LinearPredictor over every label) for the classes it will see,
    when it can start from given weights (scikit-learn's `warm_start` with `coef_` / `intercept_`)."""
    weight, bias = getattr(start, "weight", None), getattr(start, "bias", None)
    if (
        weight is None
        or "warm_start" not in estimator.get_params()
        or not hasattr(estimator, "predict_proba")
    ):
        return
    coef, intercept = weight[classes], bias[classes]
    if len(classes) == 2:  # scikit-learn keeps one row for the second class (see linear_from_sklearn)
        coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
    estimator.set_params(warm_start=True)
    estimator.coef_, estimator.intercept_ = coef.copy(), intercept.copy()


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
    probabilities, seconds = out_of_fold_probabilities(
        spec, x, y, x_val, y_val, num_labels, probe_args, chosen, usable, seed, start
    )
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
