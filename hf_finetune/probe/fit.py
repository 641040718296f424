"""The feature path: classic and small classifiers fitted on frozen, cached backbone features.

One run, as data flows through it:

    data (prepare_data) ──▶ features of each checkpoint, per split (features.py: cached by fingerprint)
        ──▶ per-backbone standardisation, concatenation when several checkpoints are fused
        ──▶ classifier from `CLASSIFIERS`, its regularisation chosen on the validation split
        ──▶ validation + test metrics ──▶ export (probe/export.py) + all_results.json, card, config

`model_name_or_path` may list several checkpoints separated by commas: their features are fused. A
linear result on one checkpoint is written into that checkpoint's own classifier layer, so the output
directory is an ordinary transformers model; everything else is an hf-finetune probe directory (see
`hf_finetune.probe.export`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_finetune.config import DataArguments, FinetuneTrainingArguments, ModelArguments
from hf_finetune.errors import UserError
from hf_finetune.outputs import atomic, card, manifest
from hf_finetune.outputs import files as output

if TYPE_CHECKING:
    import numpy as np

    from hf_finetune.probe.predictors import Predictor

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------
@dataclass
class ProbeArguments:
    """How the frozen features are computed, cached and classified."""

    classifier: str = field(
        default="logistic_regression",
        metadata={
            "help": "logistic_regression, linear_svm, gaussian_nb, knn, linear (torch head) or mlp (torch head)."
        },
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of cached features (default: $HF_FINETUNE_FEATURES_CACHE or "
            "~/.cache/hf_finetune/features). Entries are keyed by checkpoint, processor, data and split."
        },
    )
    feature_batch_size: int = field(default=64, metadata={"help": "Images per backbone forward pass."})
    recompute_features: bool = field(
        default=False, metadata={"help": "Ignore cached features and compute (and cache) them again."}
    )
    c_values: list[float] = field(
        default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0],
        metadata={
            "help": "Inverse regularisation strengths C tried for logistic_regression / linear_svm; the best on "
            "validation wins (ties: the first listed)."
        },
    )
    max_iter: int = field(
        default=2000, metadata={"help": "Solver iterations for logistic_regression / linear_svm."}
    )
    knn_neighbors: list[int] = field(
        default_factory=lambda: [1, 3, 5, 10, 20, 50],
        metadata={"help": "Neighbour counts k tried for knn; the best on validation wins."},
    )
    nb_var_smoothing: list[float] = field(
        default_factory=lambda: [1e-9, 1e-6, 1e-3, 1e-2, 1e-1],
        metadata={"help": "Variance smoothing values tried for gaussian_nb; the best on validation wins."},
    )
    head_epochs: int = field(default=10, metadata={"help": "Epochs over the cached features (linear / mlp)."})
    head_learning_rate: float = field(
        default=0.03, metadata={"help": "AdamW peak learning rate, cosine decay (linear / mlp)."}
    )
    head_batch_size: int = field(default=64, metadata={"help": "Feature rows per step (linear / mlp)."})
    head_weight_decay: list[float] = field(
        default_factory=lambda: [0.0, 0.01, 0.1],
        metadata={"help": "AdamW weight decays tried for linear / mlp; the best on validation wins."},
    )
    refit_on_validation: bool = field(
        default=False,
        metadata={
            "help": "Once the hyperparameter is chosen on validation, fit the classifier again with it on train + "
            "validation (scikit-learn's GridSearchCV refit) and save that one. Validation metrics stay those "
            "of the classifier fitted on train only (the refit one has seen validation); test metrics are the "
            "refit one's. Needs a test split."
        },
    )
    mlp_hidden_size: int = field(default=256, metadata={"help": "Hidden width of the mlp head."})
    mlp_dropout: float = field(default=0.2, metadata={"help": "Dropout inside the mlp head while training."})

    def __post_init__(self):
        if self.classifier not in CLASSIFIERS:
            close = difflib.get_close_matches(self.classifier, list(CLASSIFIERS), n=1)
            raise UserError(
                f"classifier={self.classifier!r} is not a probe classifier"
                + (f" (did you mean `{close[0]}`?)" if close else "")
                + f"; choose one of {', '.join(CLASSIFIERS)}."
            )
        grids = {
            "c_values": self.c_values,
            "knn_neighbors": self.knn_neighbors,
            "nb_var_smoothing": self.nb_var_smoothing,
            "head_weight_decay": self.head_weight_decay,
        }
        for name, values in grids.items():
            if not values:
                raise UserError(f"{name} is empty: give at least one value to try.")
        for name in ("c_values", "knn_neighbors", "nb_var_smoothing"):
            if any(v <= 0 for v in grids[name]):
                raise UserError(f"{name}={grids[name]} must all be positive.")
        if any(v < 0 for v in self.head_weight_decay):
            raise UserError(f"head_weight_decay={self.head_weight_decay} must all be >= 0.")
        for name in ("feature_batch_size", "max_iter", "head_epochs", "head_batch_size", "mlp_hidden_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1.")
        if not 0.0 <= self.mlp_dropout < 1.0:
            raise UserError(f"mlp_dropout={self.mlp_dropout} must be in [0, 1).")


@dataclass
class ProbeRunArguments(ProbeArguments):
    """`ProbeArguments` plus `strategy: probe`, so a probe YAML reads like any other strategy's."""

    config_section = "ProbeArguments"  # heading in resolved_config.yaml (a class attribute, not a setting)

    strategy: str = field(
        default="probe", metadata={"help": "Always `probe` here (frozen features + classifier)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.strategy != "probe":
            raise UserError(
                f"strategy={self.strategy!r} in a probe run: the frozen-feature path only runs `probe`. Use "
                "`hf-finetune train` for the gradient strategies."
            )


def parse_probe_args(
    argv: list[str] | None = None, prog: str = "hf-finetune probe", default_config: str | None = None
):
    """(model_args, data_args, probe_args, training_args) from `--config` (else `default_config`) + flags."""
    from hf_finetune.config_loading import parse_args

    return parse_args(
        (ModelArguments, DataArguments, ProbeRunArguments, FinetuneTrainingArguments),
        argv,
        prog=prog,
        default_config=default_config,
    )


# --------------------------------------------------------------------------------------------------------
# Classifier registry
# --------------------------------------------------------------------------------------------------------
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
    log_choice: bool = True  # False for a refit, whose "validation" rows are among those it is fitted on


@dataclass
class Fitted:
    """A fitted classifier: its predictor, the chosen hyperparameter and the validation score of each."""

    predictor: Predictor
    chosen: dict[str, Any]
    grid: list[dict[str, Any]]


@dataclass(frozen=True)
class ClassifierSpec:
    name: str
    fit: Callable[[FitInputs, ProbeArguments], Fitted]
    linear: bool  # its result is one linear layer, which can live in the checkpoint's own head
    description: str


CLASSIFIERS: dict[str, ClassifierSpec] = {}


def register_classifier(name: str, *, linear: bool, description: str):
    """Decorator: make `fit(inputs, probe_args) -> Fitted` available as `classifier: <name>`."""

    def register(fit):
        CLASSIFIERS[name] = ClassifierSpec(name, fit, linear, description)
        return fit

    return register


def _accuracy(predictor: Predictor, x, y) -> float:
    return float((predictor.scores(x).argmax(axis=1) == y).mean())


def _select(name: str, values, fit_one: Callable[[Any], Predictor], inputs: FitInputs) -> Fitted:
    """Fit once per value, keep the best on validation (ties: the first value listed)."""
    best: tuple[float, Any, Predictor] | None = None
    grid = []
    for value in values:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            predictor = fit_one(value)
        converged = not any("converge" in str(w.message).lower() for w in caught)
        accuracy = _accuracy(predictor, inputs.x_val, inputs.y_val)
        grid.append({name: value, "validation_accuracy": round(accuracy, 6), "converged": converged})
        if best is None or accuracy > best[0]:
            best = (accuracy, value, predictor)
    assert best is not None
    if not inputs.log_choice:
        return Fitted(best[2], {name: best[1]}, grid)
    if not all(g["converged"] for g in grid if g[name] == best[1]):
        logger.warning(
            "The solver did not fully converge at %s=%s; raise max_iter for a tighter fit.", name, best[1]
        )
    logger.info(
        "Validation accuracy by %s: %s -> chose %s=%s",
        name,
        ", ".join(f"{g[name]}: {g['validation_accuracy']:.4f}" for g in grid),
        name,
        best[1],
    )
    return Fitted(best[2], {name: best[1]}, grid)


# The name `_select` records a classifier's hyperparameter under -> the ProbeArguments grid it comes from.
_GRID_SETTING = {
    "C": "c_values",
    "var_smoothing": "nb_var_smoothing",
    "n_neighbors": "knn_neighbors",
    "weight_decay": "head_weight_decay",
}


def refit(spec: ClassifierSpec, selected: Fitted, inputs: FitInputs, args: ProbeArguments) -> Fitted:
    """`spec` fitted again on train + validation with the hyperparameter `selected` chose on validation (the
    grid and the choice are kept as they were: nothing is chosen on the rows it is fitted on)."""
    import numpy as np

    (name, value), *_ = selected.chosen.items()
    one_value = dataclasses.replace(args, **{_GRID_SETTING[name]: [value]})
    both = FitInputs(
        np.concatenate([inputs.x_train, inputs.x_val]),
        np.concatenate([inputs.y_train, inputs.y_val]),
        inputs.x_val,  # only to fill the one-value grid's score, which is not used
        inputs.y_val,
        inputs.num_labels,
        inputs.seed,
        inputs.device,
        log_choice=False,
    )
    logger.info(
        "Refitting %s with %s on train + validation (%d rows).", spec.name, selected.chosen, len(both.y_train)
    )
    return Fitted(spec.fit(both, one_value).predictor, selected.chosen, selected.grid)


def _linear_from_sklearn(estimator, num_labels: int):
    """sklearn coef_/intercept_ (over the classes seen in train) as a LinearPredictor over every label."""
    import numpy as np

    from hf_finetune.probe.predictors import ABSENT_CLASS_SCORE, LinearPredictor

    coef = np.atleast_2d(estimator.coef_).astype(np.float64)
    intercept = np.atleast_1d(estimator.intercept_).astype(np.float64)
    classes = np.asarray(estimator.classes_, dtype=np.int64)
    if coef.shape[0] == 1 and len(classes) == 2:
        # Binary models keep one row for the second class; [-z/2, +z/2] gives the same softmax and argmax.
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_labels, coef.shape[1]))
    bias = np.full(num_labels, ABSENT_CLASS_SCORE)
    weight[classes], bias[classes] = coef, intercept
    return LinearPredictor(weight, bias)


@register_classifier(
    "logistic_regression", linear=True, description="multinomial logistic regression (lbfgs), C on validation"
)
def fit_logistic_regression(inputs: FitInputs, args: ProbeArguments) -> Fitted:
    from sklearn.linear_model import LogisticRegression

    # One estimator, warm-started from the previous C's solution: the problem is convex, so the optimum is
    # the same as from scratch, and neighbouring C values are reached in a fraction of the iterations.
    model = LogisticRegression(max_iter=args.max_iter, random_state=inputs.seed, warm_start=True)

    def fit_one(c):
        model.set_params(C=c)
        return _linear_from_sklearn(model.fit(inputs.x_train, inputs.y_train), inputs.num_labels)

    return _select("C", args.c_values, fit_one, inputs)


@register_classifier(
    "linear_svm", linear=True, description="one-vs-rest linear SVM (liblinear), C on validation"
)
def fit_linear_svm(inputs: FitInputs, args: ProbeArguments) -> Fitted:
    from sklearn.svm import LinearSVC

    def fit_one(c):
        model = LinearSVC(C=c, max_iter=args.max_iter, random_state=inputs.seed)
        return _linear_from_sklearn(model.fit(inputs.x_train, inputs.y_train), inputs.num_labels)

    return _select("C", args.c_values, fit_one, inputs)


@register_classifier(
    "gaussian_nb", linear=False, description="Gaussian naive Bayes, var_smoothing on validation"
)
def fit_gaussian_nb(inputs: FitInputs, args: ProbeArguments) -> Fitted:
    import numpy as np
    from sklearn.naive_bayes import GaussianNB

    from hf_finetune.probe.predictors import ABSENT_CLASS_SCORE, GaussianNBPredictor

    def fit_one(smoothing):
        model = GaussianNB(var_smoothing=smoothing).fit(inputs.x_train, inputs.y_train)
        dim = inputs.x_train.shape[1]
        theta, var = np.zeros((inputs.num_labels, dim)), np.ones((inputs.num_labels, dim))
        log_prior = np.full(inputs.num_labels, ABSENT_CLASS_SCORE)
        classes = model.classes_.astype(np.int64)
        theta[classes], var[classes] = model.theta_, model.var_
        log_prior[classes] = np.log(model.class_prior_)
        return GaussianNBPredictor(theta, var, log_prior)

    return _select("var_smoothing", args.nb_var_smoothing, fit_one, inputs)


@register_classifier(
    "knn", linear=False, description="distance-weighted k nearest neighbours, k on validation"
)
def fit_knn(inputs: FitInputs, args: ProbeArguments) -> Fitted:
    from hf_finetune.probe.predictors import KNNPredictor

    rows = len(inputs.y_train)
    values = list(dict.fromkeys(min(int(k), rows) for k in args.knn_neighbors))
    return _select(
        "n_neighbors",
        values,
        lambda k: KNNPredictor(inputs.x_train, inputs.y_train, k, inputs.num_labels),
        inputs,
    )


# Multiply-adds per step (batch x widest weight matrix) under which a CPU head trains single-threaded.
SINGLE_THREAD_BELOW = 2**24


def train_torch_head(build, inputs: FitInputs, args: ProbeArguments, weight_decay: float):
    """`build()` a head and train it for `head_epochs` (AdamW, cosine schedule, cross-entropy) on the cached
    features; returns it in eval mode on the CPU. Seeded before `build()`, so the result does not depend on
    what consumed random numbers earlier in the run (a cold run loads a model first, a warm one does not)."""
    import torch

    torch.manual_seed(inputs.seed)
    generator = torch.Generator().manual_seed(inputs.seed)
    net = build()
    widest = max(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    threads = torch.get_num_threads()
    if str(inputs.device).startswith("cpu") and args.head_batch_size * widest < SINGLE_THREAD_BELOW:
        # A small head's matrix products are too small to split across threads: on a busy machine the
        # waiting for the other threads costs several times the work (measured: 0.5 s vs 5 s for an MLP).
        torch.set_num_threads(1)
    try:
        return _train(net, inputs, args, weight_decay, generator)
    finally:
        torch.set_num_threads(threads)


def _train(net, inputs: FitInputs, args: ProbeArguments, weight_decay: float, generator):
    import torch

    net = net.to(inputs.device).train()
    x = torch.from_numpy(inputs.x_train).to(inputs.device)
    y = torch.from_numpy(inputs.y_train).long().to(inputs.device)
    steps_per_epoch = -(-len(y) // args.head_batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.head_learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.head_epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(args.head_epochs):
        order = torch.randperm(len(y), generator=generator).to(inputs.device)
        for start in range(0, len(y), args.head_batch_size):
            rows = order[start : start + args.head_batch_size]
            loss = loss_fn(net(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval().cpu()


@register_classifier("linear", linear=True, description="torch linear head, weight decay on validation")
def fit_linear_head(inputs: FitInputs, args: ProbeArguments) -> Fitted:
    from torch import nn

    from hf_finetune.probe.predictors import LinearPredictor

    def fit_one(weight_decay):
        net = train_torch_head(
            lambda: nn.Linear(inputs.x_train.shape[1], inputs.num_labels), inputs, args, weight_decay
        )
        return LinearPredictor(net.weight.detach().double().numpy(), net.bias.detach().double().numpy())

    return _select("weight_decay", args.head_weight_decay, fit_one, inputs)


@register_classifier(
    "mlp", linear=False, description="torch MLP head (one GELU hidden layer), weight decay on validation"
)
def fit_mlp_head(inputs: FitInputs, args: ProbeArguments) -> Fitted:
    from hf_finetune.probe.predictors import MLPPredictor, build_mlp

    def fit_one(weight_decay):
        dim = inputs.x_train.shape[1]
        net = train_torch_head(
            lambda: build_mlp(dim, args.mlp_hidden_size, inputs.num_labels, args.mlp_dropout),
            inputs,
            args,
            weight_decay,
        )
        return MLPPredictor({name: t.detach().numpy() for name, t in net.state_dict().items()})

    return _select("weight_decay", args.head_weight_decay, fit_one, inputs)


# --------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------
def _autocast_dtype(training_args, device) -> Any:
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None  # features on the CPU stay float32: autocast there is slower, not faster
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return None


@dataclass
class ProbeResult:
    """Everything a fitted probe run knows, before anything is written to `output_dir`."""

    spec: ClassifierSpec
    backbones: list[Any]  # features.Backbone, in `model_name_or_path` order
    data: Any  # data.PreparedData
    normaliser: Any  # probe.predictors.Normaliser
    fitted: Fitted
    x: dict[str, np.ndarray]  # normalised, fused features per split
    y: dict[str, np.ndarray]
    results: dict[str, Any]
    cache_dir: Path
    cache_entries: list[dict[str, Any]]

    def predictions(self, split: str) -> np.ndarray:
        """Label ids the fitted classifier predicts for a split (rows in dataset order)."""
        return self.fitted.predictor.scores(self.x[split]).argmax(axis=1)

    def log_probabilities(self, split: str) -> np.ndarray:
        """Log class probabilities for a split: logits whose softmax is the classifier's probabilities."""
        import numpy as np

        return np.log(np.clip(self.fitted.predictor.probabilities(self.x[split]), 1e-300, None))


def fit_probe(
    model_args: ModelArguments,
    data_args: DataArguments,
    probe_args: ProbeArguments,
    training_args: FinetuneTrainingArguments,
    dataset=None,
) -> ProbeResult:
    """Data, features (cached), normalisation, classifier and metrics; writes nothing but the feature cache."""
    import numpy as np

    from hf_finetune.data.prepare import prepare_data
    from hf_finetune.probe.cache import FeatureCache
    from hf_finetune.probe.features import Backbone, ExtractionReport, extract_features, split_checkpoints
    from hf_finetune.probe.predictors import Normaliser
    from hf_finetune.train.metrics import classification_metrics

    start = time.perf_counter()
    spec = CLASSIFIERS[probe_args.classifier]
    if getattr(model_args, "from_scratch", False):
        raise UserError(
            "from_scratch is set, but the probe only fits classifiers on the features of pretrained checkpoints, "
            "which it never trains: features of random weights are not worth caching or fitting on. Unset "
            "from_scratch, or use `hf-finetune train` to train a model from scratch."
        )
    if training_args.world_size > 1:
        raise UserError(
            f"The probe runs in one process, but this launch has {training_args.world_size}: each image's "
            "features are computed once, so there is nothing to split. Run it with plain `python` (it uses the "
            "GPU when there is one), not `accelerate launch` / torchrun."
        )

    # Checkpoints first: a bad one (not an image model, no pooled output) fails before the data is read.
    backbones = [Backbone(args) for args in split_checkpoints(model_args)]
    data = prepare_data(data_args, training_args.seed, cache_dir=model_args.cache_dir, dataset=dataset)
    num_labels = len(data.labels)
    if probe_args.refit_on_validation and "test" not in data.splits:
        raise UserError(
            "refit_on_validation fits the saved classifier on train + validation, so without a test split no "
            "reported number would come from pictures it has not seen. Add a test split (test_dir, or "
            "train_test_split: 0.15), or set refit_on_validation: false."
        )

    ######################################
    # Features: cached, or computed once #
    ######################################
    cache = FeatureCache(probe_args.feature_cache_dir)
    device = training_args.device
    report = ExtractionReport()
    features = [
        extract_features(
            backbone,
            data.splits,
            data.image_column,
            data.label_column,
            data.labels,
            cache,
            batch_size=probe_args.feature_batch_size,
            num_workers=training_args.dataloader_num_workers,
            device=device,
            autocast_dtype=_autocast_dtype(training_args, device),
            recompute=probe_args.recompute_features,
            report=report,
        )
        for backbone in backbones
    ]
    feature_seconds = time.perf_counter() - start

    ##############################################
    # Normalise per backbone, fuse, fit on train #
    ##############################################
    fit_start = time.perf_counter()
    normaliser = Normaliser.fit([f["train"].features for f in features])
    x = {split: normaliser([f[split].features for f in features]) for split in data.splits}
    y = {split: np.asarray(features[0][split].labels) for split in data.splits}
    logger.info(
        "Fitting %s on %d x %d features (%s).",
        spec.name,
        *x["train"].shape,
        " + ".join(f"{b.name}: {d}" for b, d in zip(backbones, normaliser.dims, strict=True)),
    )
    inputs = FitInputs(
        x["train"], y["train"], x["validation"], y["validation"], num_labels, training_args.seed, str(device)
    )
    selected = fitted = spec.fit(inputs, probe_args)  # chosen on validation, fitted on train only
    if probe_args.refit_on_validation:
        fitted = refit(spec, selected, inputs, probe_args)
    fit_seconds = time.perf_counter() - fit_start

    ###########
    # Metrics #
    ###########
    results: dict[str, Any] = {"train_samples": len(y["train"])}
    if probe_args.refit_on_validation:
        results["refit_samples"] = len(y["train"]) + len(y["validation"])
    # Validation: the classifier fitted on train only (a refit one has seen validation). Test: the saved one.
    for split, prefix, predictor in (("validation", "eval", selected), ("test", "test", fitted)):
        if split in x:
            metrics = classification_metrics(predictor.predictor.scores(x[split]), y[split], num_labels)
            results.update({f"{prefix}_{name}": value for name, value in metrics.items()})
            results[f"{prefix}_samples"] = len(y[split])
    results.update(
        {
            "backbone_forward_passes": sum(f[split].forward_passes for f in features for split in f),
            "feature_cache_hits": sum(e["cache"] == "hit" for e in report.entries),
            "feature_cache_misses": sum(e["cache"] == "miss" for e in report.entries),
            "probe_feature_seconds": round(feature_seconds, 3),
            "probe_fit_seconds": round(fit_seconds, 3),
        }
    )
    return ProbeResult(spec, backbones, data, normaliser, fitted, x, y, results, cache.root, report.entries)


def save_probe(
    result: ProbeResult,
    model_args: ModelArguments,
    data_args: DataArguments,
    probe_args: ProbeArguments,
    training_args: FinetuneTrainingArguments,
    started: float | None = None,
    hub_token: str | None = None,
    record: manifest.RunOutput | None = None,
) -> str:
    """Write the output directory of a fitted probe; returns the export format (see probe.export).

    `started` (a `time.perf_counter()` value) adds `total_seconds`, end to end, to the results. With
    `training_args.push_to_hub`, the finished folder is published with `hub_token` (or the login's token).
    `record` (from `training.start_output`) is told what was written, before anything is published.
    """
    from hf_finetune.probe.export import (
        FORMAT_PROBE,
        FORMAT_TRANSFORMERS,
        export_linear,
        export_probe_directory,
        linear_head,
        write_probe_card,
    )

    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    labels, spec, fitted = result.data.labels, result.spec, result.fitted
    strategy = f"probe-{spec.name}"

    ##########################################################################
    # Export: into the checkpoint's own head when linear, else a probe folder #
    ##########################################################################
    infos = [
        {"name": b.name, "revision": b.model_args.model_revision, "identity": b.identity, "dim": dim}
        for b, dim in zip(result.backbones, result.normaliser.dims, strict=True)
    ]
    head = None
    if spec.linear and len(result.backbones) == 1:
        head = linear_head(result.backbones[0].model(labels), len(labels))
        if head is None:
            logger.warning(
                "The head of %s is not a single Linear on the pooled features, so the linear probe cannot be "
                "written into it; saving an hf-finetune probe directory instead.",
                result.backbones[0].name,
            )
    if head is not None:
        fmt = FORMAT_TRANSFORMERS
        backbone = result.backbones[0]
        export_linear(
            output_dir,
            backbone.model(labels).cpu(),
            backbone.image_processor,
            result.normaliser,
            fitted.predictor,
            labels,
            spec.name,
            fitted.chosen,
            infos[0],
        )
    else:
        fmt = FORMAT_PROBE
        export_probe_directory(
            output_dir,
            [
                (b.model(labels).cpu(), b.image_processor, info)
                for b, info in zip(result.backbones, infos, strict=True)
            ],
            result.normaliser,
            fitted.predictor,
            labels,
            spec.name,
            fitted.chosen,
        )

    ###########################################################
    # Config, summary, reports, card and metrics, like `train` #
    ###########################################################
    from hf_finetune.outputs.reports import report_section, write_reports
    from hf_finetune.train.run import undecoded_images

    results = result.results
    output.write_resolved_config(output_dir, model_args, data_args, probe_args, training_args)
    output.write_bad_images(output_dir, result.data.bad_images)
    atomic.write_json(output_dir / output.DATA_SPLITS, {"labels": labels, "splits": result.data.report})
    report_split = "test" if "test" in result.x else "validation"
    report_files = write_reports(
        output_dir,
        logits=result.log_probabilities(report_split),
        labels=result.y[report_split],
        label_names=labels,
        images=undecoded_images(result.data.splits[report_split], result.data.image_column),
        split=report_split,
        locate=result.data.image_name,
    )
    atomic.write_json(
        output_dir / output.RUN_SUMMARY,
        {
            "strategy": strategy,
            "classifier": spec.name,
            "export_format": fmt,
            "is_transformers_model": fmt == FORMAT_TRANSFORMERS,
            "checkpoints": [b.name for b in result.backbones],
            "chosen": fitted.chosen,
            # Numbers the fitted classifier holds (weights, class statistics, or kNN's stored rows).
            "classifier_parameters": int(sum(a.size for a in fitted.predictor.arrays().values())),
            "validation_grid": fitted.grid,
            # True: the saved classifier was fitted again on train + validation with the chosen value; the
            # validation metrics are those of the one fitted on train only.
            "refit_on_validation": probe_args.refit_on_validation,
            # Published with the folder: no absolute path of this machine (see README, "safety").
            "feature_cache_dir": os.path.relpath(result.cache_dir),
            "feature_cache": [
                {**entry, "path": os.path.relpath(entry["path"], result.cache_dir)}
                for entry in result.cache_entries
            ],
            "bad_images_skipped": len(result.data.bad_images),
        },
    )
    settings = {"classifier": spec.name, **card.non_default_settings(probe_args)}
    settings.update({f"chosen on validation: {k}": v for k, v in fitted.chosen.items()})
    if len(result.backbones) > 1:
        settings["fused checkpoints"] = ", ".join(b.name for b in result.backbones)
    content = card.ModelCardContent.for_run(
        output_dir,
        training_args,
        data_args,
        base_model=result.backbones[0].name if len(result.backbones) == 1 else None,
        labels=labels,
        results=results,
        strategy=strategy,
        strategy_settings=settings,
        sections=[report_section(report_files)],
    )
    write_probe_card(output_dir, fmt, content)
    # Metrics last: all_results.json marks a finished run (see training.prepare_output_dir).
    if started is not None:
        results["total_seconds"] = round(time.perf_counter() - started, 3)
    for prefix in ("eval", "test"):
        split_results = {k: v for k, v in results.items() if k.startswith(prefix + "_")}
        if split_results:
            atomic.write_json(output_dir / f"{prefix}_results.json", split_results)
    atomic.write_json(output_dir / manifest.ALL_RESULTS, results)
    if record is not None:
        record.finish()
    logger.info(
        "Probe %s: validation accuracy %.4f%s; %d backbone forward pass(es); output in %s (%s).",
        spec.name,
        results["eval_accuracy"],
        f", test accuracy {results['test_accuracy']:.4f}" if "test_accuracy" in results else "",
        results["backbone_forward_passes"],
        output_dir,
        "a plain transformers model" if fmt == FORMAT_TRANSFORMERS else "an hf-finetune probe directory",
    )
    if training_args.push_to_hub:
        from hf_finetune.outputs.publish import publish

        repo_id = training_args.hub_model_id or output_dir.name
        publish(output_dir, repo_id, private=training_args.hub_private_repo, token=hub_token)
    return fmt


def run_probe(
    model_args: ModelArguments,
    data_args: DataArguments,
    probe_args: ProbeArguments,
    training_args: FinetuneTrainingArguments,
    dataset=None,
) -> dict[str, Any]:
    """Features (cached), classifier, metrics, export: a complete output directory. Returns all metrics."""
    from transformers import set_seed

    from hf_finetune.config_resolved import expand_output_dir
    from hf_finetune.train.run import prepare_output_dir, start_output

    expand_output_dir(training_args, model_args, data_args, probe_args)  # e.g. outputs/probe/{classifier}
    set_seed(training_args.seed)
    started = time.perf_counter()
    # Refuses to replace a finished run unless overwrite_output_dir, and fails early on an unwritable folder.
    prepare_output_dir(training_args)
    # The token is only handed to the publisher: it never reaches a file or a log.
    hub_token, training_args.hub_token = training_args.hub_token, None
    result = fit_probe(model_args, data_args, probe_args, training_args, dataset=dataset)
    # Fitted: only now are the previous run's files replaced (a run that fails earlier leaves them as they were).
    record = start_output(training_args)
    save_probe(result, model_args, data_args, probe_args, training_args, started=started, hub_token=hub_token,
               record=record)  # fmt: skip
    return result.results
