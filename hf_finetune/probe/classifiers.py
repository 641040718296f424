"""The probe's classifiers, by the name `classifier:` takes in a probe YAML (`CLASSIFIERS`): the classic
scikit-learn ones, and two small torch heads (`heads.TorchHead`, a scikit-learn estimator too).

Each is fitted on the standardised train features with its regularisation chosen on validation (see
`search.py`) and saved as plain arrays (a `Predictor` of `probe.predictors`). Classes that never occur in the
training split get a score that can never win, so every predictor covers the full label set. On multi-label
data the ones registered with `multi_label=True` (logistic regression, linear SVM) fit one binary estimator per
label (see `search.py`), saved as one linear layer whose sigmoids are the per-label probabilities; the others
are refused (`multi_label_names`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_finetune.probe.search import ClassifierSpec, FitInputs

if TYPE_CHECKING:
    from collections.abc import Callable

    from hf_finetune.probe.arguments import ProbeArguments
    from hf_finetune.probe.heads import TorchHead
    from hf_finetune.probe.predictors import GaussianNBPredictor, KNNPredictor, LinearPredictor, Predictor


CLASSIFIERS: dict[str, ClassifierSpec] = {}


def register_classifier(
    name: str, param: str, setting: str, predictor, *, linear: bool, values=None, multi_label: bool = False
):
    """Decorator: `estimator(inputs, args)` (an unfitted scikit-learn estimator, its docstring the description)
    becomes `classifier: <name>`, with `param` chosen on validation among the values of `setting`."""

    def register(estimator: Callable) -> Callable:
        description = " ".join((estimator.__doc__ or name).split())
        CLASSIFIERS[name] = ClassifierSpec(
            name, linear, description, param, setting, estimator, predictor, values, multi_label
        )
        return estimator

    return register


def multi_label_names() -> list[str]:
    """The classifiers that fit multi-label data."""
    return [name for name, spec in CLASSIFIERS.items() if spec.multi_label]


def multi_label_gap(spec: ClassifierSpec, checkpoints: int, several_layers: bool) -> str | None:
    """Why a probe cannot fit multi-label data (None when it can): a classifier with no one-vs-rest linear
    form, or features (fused checkpoints, stage outputs) that no single head Linear takes."""
    if not spec.multi_label:
        return f"classifier={spec.name!r} gives one class per picture"
    if checkpoints > 1:
        return "several checkpoints are fused, and a multi-label probe lives in one checkpoint's head"
    if several_layers:
        return "feature_layers adds stage outputs, and a multi-label probe lives in one checkpoint's head"
    return None


def check_multi_label(spec: ClassifierSpec, checkpoints: int, several_layers: bool) -> None:
    """A clear error for a probe that cannot fit multi-label data (see `multi_label_gap`)."""
    from hf_finetune.errors import UserError

    gap = multi_label_gap(spec, checkpoints, several_layers)
    if gap:
        raise UserError(
            f"The data is multi-label (a set of labels per picture), and {gap}. A multi-label probe is one binary "
            f"classifier per label ({' or '.join(multi_label_names())}, C chosen on validation mAP) saved into the "
            "checkpoint's own head (sigmoid scores through pipeline()): give one model_name_or_path, "
            "feature_layers: last and one of those classifiers, or use a gradient strategy."
        )


# --------------------------------------------------------------------------------------------------------
# A fitted estimator as the arrays that are saved
# --------------------------------------------------------------------------------------------------------
def linear_from_sklearn(estimator, inputs: FitInputs) -> LinearPredictor:
    """sklearn coef_/intercept_ (over the classes seen in train) as a LinearPredictor over every label."""
    import numpy as np

    from hf_finetune.probe.predictors import ABSENT_CLASS_SCORE, LinearPredictor

    if inputs.multi_label:
        return _one_vs_rest_linear(estimator)
    coef = np.atleast_2d(estimator.coef_).astype(np.float64)
    intercept = np.atleast_1d(estimator.intercept_).astype(np.float64)
    classes = np.asarray(estimator.classes_, dtype=np.int64)
    if coef.shape[0] == 1 and len(classes) == 2:
        # Binary models keep one row for the second class; [-z/2, +z/2] gives the same softmax and argmax.
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((inputs.num_labels, coef.shape[1]))
    bias = np.full(inputs.num_labels, ABSENT_CLASS_SCORE)
    weight[classes], bias[classes] = coef, intercept
    return LinearPredictor(weight, bias)


def _one_vs_rest_linear(estimator) -> LinearPredictor:
    """A fitted `OneVsRestClassifier` of linear binary estimators as one LinearPredictor: each label's row is its
    estimator's decision function (a logit for logistic regression). A label that was on every training picture,
    or on none, has a constant estimator: a zero row whose bias says so."""
    import numpy as np

    from hf_finetune.probe.predictors import ABSENT_CLASS_SCORE, LinearPredictor

    dim = estimator.n_features_in_
    weight, bias = np.zeros((len(estimator.estimators_), dim)), np.zeros(len(estimator.estimators_))
    for row, binary in enumerate(estimator.estimators_):
        if hasattr(binary, "coef_"):
            weight[row], bias[row] = np.ravel(binary.coef_), np.ravel(binary.intercept_)[0]
        else:  # scikit-learn's constant predictor: y_ is that label's one value in train
            bias[row] = -ABSENT_CLASS_SCORE if np.ravel(binary.y_)[0] else ABSENT_CLASS_SCORE
    return LinearPredictor(weight, bias)


def gaussian_nb_predictor(estimator, inputs: FitInputs) -> GaussianNBPredictor:
    """A fitted GaussianNB's class statistics over every label (absent classes: a prior that never wins)."""
    import numpy as np

    from hf_finetune.probe.predictors import ABSENT_CLASS_SCORE, GaussianNBPredictor

    dim = estimator.theta_.shape[1]
    theta, var = np.zeros((inputs.num_labels, dim)), np.ones((inputs.num_labels, dim))
    log_prior = np.full(inputs.num_labels, ABSENT_CLASS_SCORE)
    classes = estimator.classes_.astype(np.int64)
    theta[classes], var[classes] = estimator.theta_, estimator.var_
    log_prior[classes] = np.log(estimator.class_prior_)
    return GaussianNBPredictor(theta, var, log_prior)


def knn_predictor(estimator, inputs: FitInputs) -> KNNPredictor:
    """The training rows it votes with, and k (the same distance-weighted KNeighborsClassifier)."""
    from hf_finetune.probe.predictors import KNNPredictor

    return KNNPredictor(inputs.x_train, inputs.y_train, estimator.n_neighbors, inputs.num_labels)


def head_predictor(estimator: TorchHead, inputs: FitInputs) -> Predictor:
    return estimator.predictor_


def _neighbour_counts(values: list, inputs: FitInputs) -> list:
    """k larger than the training split means all of it: one candidate, tried once."""
    return list(dict.fromkeys(min(int(k), len(inputs.y_train)) for k in values))


# --------------------------------------------------------------------------------------------------------
# The classifiers, in the order the error message for an unknown name lists them
# --------------------------------------------------------------------------------------------------------
@register_classifier(
    "logistic_regression", "C", "c_values", linear_from_sklearn, linear=True, multi_label=True
)
def logistic_regression(inputs: FitInputs, args: ProbeArguments):
    """multinomial logistic regression (lbfgs), C on validation"""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=args.max_iter, random_state=inputs.seed)


@register_classifier("linear_svm", "C", "c_values", linear_from_sklearn, linear=True, multi_label=True)
def linear_svm(inputs: FitInputs, args: ProbeArguments):
    """one-vs-rest linear SVM (liblinear), C on validation"""
    from sklearn.svm import LinearSVC

    return LinearSVC(max_iter=args.max_iter, random_state=inputs.seed)


@register_classifier("gaussian_nb", "var_smoothing", "nb_var_smoothing", gaussian_nb_predictor, linear=False)
def gaussian_nb(inputs: FitInputs, args: ProbeArguments):
    """Gaussian naive Bayes, var_smoothing on validation"""
    from sklearn.naive_bayes import GaussianNB

    return GaussianNB()


@register_classifier(
    "knn", "n_neighbors", "knn_neighbors", knn_predictor, linear=False, values=_neighbour_counts
)
def knn(inputs: FitInputs, args: ProbeArguments):
    """distance-weighted k nearest neighbours, k on validation"""
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(weights="distance")


def _torch_head(kind: str, inputs: FitInputs, args: ProbeArguments) -> TorchHead:
    from hf_finetune.probe.heads import TorchHead

    return TorchHead(
        kind,
        num_labels=inputs.num_labels,
        epochs=args.head_epochs,
        learning_rate=args.head_learning_rate,
        batch_size=args.head_batch_size,
        hidden_size=args.mlp_hidden_size,
        dropout=args.mlp_dropout,
        seed=inputs.seed,
        device=inputs.device,
    )


@register_classifier("linear", "weight_decay", "head_weight_decay", head_predictor, linear=True)
def linear_head(inputs: FitInputs, args: ProbeArguments) -> TorchHead:
    """torch linear head, weight decay on validation"""
    return _torch_head("linear", inputs, args)


@register_classifier("mlp", "weight_decay", "head_weight_decay", head_predictor, linear=False)
def mlp_head(inputs: FitInputs, args: ProbeArguments) -> TorchHead:
    """torch MLP head (one GELU hidden layer), weight decay on validation"""
    return _torch_head("mlp", inputs, args)
