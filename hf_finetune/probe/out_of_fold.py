"""Out-of-fold probabilities of a probe's classifier on its training rows: each row predicted by the classifier
fitted on the other folds (stratified k-fold), with the hyperparameter the probe chose on validation.

Two users: the inspection's label issues (cleanlab judges each label by what the other pictures say) and a
probe's calibration (a temperature fitted on predictions no classifier made about pictures it had seen, and that
did not choose the regularisation either, as the validation split did).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def out_of_fold_probabilities(
    spec, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_labels: int, probe_args,
    chosen: dict[str, Any], folds: int, seed: int, start=None, desc: str = "Out-of-fold predictions",
) -> tuple[np.ndarray, list[float]]:  # fmt: skip
    """Probabilities for every row of `x`, each from `spec` fitted on the other folds with the value `chosen`
    (the probe's own estimator and saved predictor, as `probe.search.refit` builds them).

    `start`: the probe's own linear predictor, fitted on all of train with the same value, from which an
    estimator that can start from given weights (logistic regression) starts each fold (`warm_start`). Each
    fold's objective (the L2-regularised log-loss) is strictly convex, so where lbfgs starts changes only how
    soon it reaches that fold's one optimum, not the optimum: the held-out rows still get the predictions of a
    classifier fitted without them (measured on the digits: the same suspects, in half the time). `desc`: the
    progress bar's label.
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
    for fit_rows, held_rows in tqdm(splitter.split(x, y), total=folds, desc=desc, unit="fold", disable=None):
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
