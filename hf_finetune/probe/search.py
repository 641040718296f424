"""Choosing a classifier's regularisation on the validation split, with scikit-learn's `GridSearchCV`.

Every probe classifier is a scikit-learn estimator (the torch heads too, see `heads.py`) described by a
`ClassifierSpec`: the estimator with everything set but one hyperparameter, the `ProbeArguments` grid that
hyperparameter's values come from, and how a fitted estimator becomes the `Predictor` that is saved.
`GridSearchCV` over a `PredefinedSplit` (train = fit, validation = score: one fold, no cross-validation)
fits one estimator per value; the best validation accuracy wins, ties going to the value listed first.

Multi-label data (labels a (rows, labels) 0/1 matrix) fits one binary estimator per label, scikit-learn's
`OneVsRestClassifier` around the same estimator, with the value chosen by validation mAP (only the
classifiers whose spec says `multi_label` can be wrapped into one exported linear layer).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from hf_finetune.probe.arguments import ProbeArguments
    from hf_finetune.probe.predictors import Predictor

logger = logging.getLogger(__name__)


@dataclass
class FitInputs:
    """Normalised features and labels of train and validation, and where torch heads train."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_labels: int
    seed: int = 0
    device: str = "cpu"

    @property
    def multi_label(self) -> bool:
        """Labels given as a (rows, labels) 0/1 matrix: several per picture."""
        return self.y_train.ndim == 2

    @property
    def metric(self) -> str:
        """What chooses on validation: mAP for multi-label data, else accuracy."""
        return "mAP" if self.multi_label else "accuracy"


@dataclass
class Fitted:
    """A fitted classifier: its predictor, the chosen hyperparameter and the validation score of each."""

    predictor: Predictor
    chosen: dict[str, Any]
    grid: list[dict[str, Any]]


@dataclass(frozen=True)
class ClassifierSpec:
    """One `classifier:` name of a probe YAML."""

    name: str
    linear: bool  # its result is one linear layer, which can live in the checkpoint's own head
    description: str
    param: str  # the estimator's hyperparameter chosen on validation (`C`, `n_neighbors`, ...)
    setting: str  # the ProbeArguments list its values come from (`c_values`, `knn_neighbors`, ...)
    # (inputs, args) -> an unfitted scikit-learn estimator with everything but `param` set
    estimator: Callable[[FitInputs, ProbeArguments], Any]
    # (fitted estimator, the inputs it was fitted on) -> the Predictor that is saved
    predictor: Callable[[Any, FitInputs], Predictor]
    # (values of `setting`, inputs) -> the values to try, when they depend on the data (kNN: k <= rows)
    values: Callable[[list, FitInputs], list] | None = None
    # one-vs-rest fits of it are exported like the single-label one (multi-label data)
    multi_label: bool = False

    def grid_values(self, inputs: FitInputs, args: ProbeArguments) -> list:
        values = list(getattr(args, self.setting))
        return self.values(values, inputs) if self.values else values

    def fit(self, inputs: FitInputs, args: ProbeArguments) -> Fitted:
        """Fitted on train, with the hyperparameter chosen on validation."""
        return choose_on_validation(self, inputs, args)

    def unfitted(self, inputs: FitInputs, args: ProbeArguments) -> tuple[Any, str]:
        """The estimator to fit and the name its hyperparameter has there: for multi-label data, one binary
        estimator per label (`OneVsRestClassifier`, whose parameter is `estimator__<param>`)."""
        estimator = self.estimator(inputs, args)
        if not inputs.multi_label:
            return estimator, self.param
        from sklearn.multiclass import OneVsRestClassifier

        return OneVsRestClassifier(estimator), f"estimator__{self.param}"


def _converged(estimator) -> bool:
    """Whether an iterative solver stopped before `max_iter` (scikit-learn's ConvergenceWarning is raised
    exactly when liblinear or lbfgs reach it); estimators without iterations always converge."""
    import numpy as np

    if hasattr(estimator, "estimators_"):  # one-vs-rest: every label's estimator
        return all(_converged(e) for e in estimator.estimators_)
    n_iter, max_iter = getattr(estimator, "n_iter_", None), estimator.get_params().get("max_iter")
    return n_iter is None or max_iter is None or bool(np.max(n_iter) < max_iter)


def choose_on_validation(spec: ClassifierSpec, inputs: FitInputs, args: ProbeArguments) -> Fitted:
    """Fit once per value of `spec.setting` on train, keep the best on validation (ties: the first listed)."""
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    from hf_finetune.train.multilabel import mean_average_precision

    values = spec.grid_values(inputs, args)
    scored: dict[Any, Predictor] = {}
    estimator, key = spec.unfitted(inputs, args)
    metric = inputs.metric

    def score(estimator, x, y) -> dict[str, float]:
        # The metric of the Predictor that would be saved (not of the estimator's own `predict`), and that
        # Predictor kept, so the chosen value needs no second fit.
        predictor = spec.predictor(estimator, inputs)
        scored[estimator.get_params()[key]] = predictor
        scores = predictor.scores(x)
        value = (
            mean_average_precision(scores, y) if inputs.multi_label else (scores.argmax(axis=1) == y).mean()
        )
        return {metric: float(value), "converged": float(_converged(estimator))}

    search = GridSearchCV(
        estimator,
        {key: values},
        scoring=score,
        refit=False,  # the saved classifier is the one fitted on train (see `refit` for train + validation)
        # -1: always fitted on; 0: the single validation fold
        cv=PredefinedSplit(np.r_[np.full(len(inputs.y_train), -1), np.zeros(len(inputs.y_val))]),
        error_score="raise",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded per value below, logged once
        search.fit(
            np.concatenate([inputs.x_train, inputs.x_val]), np.concatenate([inputs.y_train, inputs.y_val])
        )
    results = search.cv_results_
    grid = [
        {spec.param: value, f"validation_{metric}": round(float(score), 6), "converged": bool(converged)}
        for value, score, converged in zip(
            values, results[f"mean_test_{metric}"], results["mean_test_converged"], strict=True
        )
    ]
    # GridSearchCV's own rule: the lowest rank, and of equal ranks the first candidate.
    best = values[int(np.argmin(results[f"rank_test_{metric}"]))]
    if not all(g["converged"] for g in grid if g[spec.param] == best):
        logger.warning(
            "The solver did not fully converge at %s=%s; raise max_iter for a tighter fit.", spec.param, best
        )
    logger.info(
        "Validation %s by %s: %s -> chose %s=%s",
        metric,
        spec.param,
        ", ".join(f"{g[spec.param]}: {g[f'validation_{metric}']:.4f}" for g in grid),
        spec.param,
        best,
    )
    return Fitted(scored[best], {spec.param: best}, grid)


def refit(spec: ClassifierSpec, selected: Fitted, inputs: FitInputs, args: ProbeArguments) -> Fitted:
    """`spec` fitted again on train + validation with the value `selected` chose on validation, as
    `GridSearchCV(refit=True)` does (the grid and the choice are kept: nothing is chosen on the rows it is
    fitted on)."""
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    both = FitInputs(
        np.concatenate([inputs.x_train, inputs.x_val]),
        np.concatenate([inputs.y_train, inputs.y_val]),
        inputs.x_val,
        inputs.y_val,
        inputs.num_labels,
        inputs.seed,
        inputs.device,
    )
    logger.info(
        "Refitting %s with %s on train + validation (%d rows).", spec.name, selected.chosen, len(both.y_train)
    )
    estimator, key = spec.unfitted(both, args)
    estimator.set_params(**{key: selected.chosen[spec.param]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the value's convergence was reported on train
        estimator.fit(both.x_train, both.y_train)
    return Fitted(spec.predictor(estimator, both), selected.chosen, selected.grid)
