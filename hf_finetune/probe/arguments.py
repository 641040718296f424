"""The probe's settings: how frozen features are computed, cached and classified (`ProbeArguments`), and
the parser of a probe run (`hf-finetune probe`, `recipes/probe.py`, `strategy: probe` in `train`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from hf_finetune.config import DataArguments, FinetuneTrainingArguments, ModelArguments
from hf_finetune.errors import UserError
from hf_finetune.models.layer_features import parse_feature_layers
from hf_finetune.probe.classifiers import CLASSIFIERS


@dataclass
class ProbeArguments:
    """How the frozen features are computed, cached and classified."""

    classifier: str = field(
        default="logistic_regression",
        metadata={
            "help": "logistic_regression, linear_svm, gaussian_nb, knn, linear (torch head) or mlp (torch head)."
        },
    )
    feature_layers: str = field(
        default="last",
        metadata={
            "help": "Which layers the features come from. `last`: the final pooled features, what the classifier "
            "head sees. `all`: those plus the global-average-pooled output of every stage (a ViT's layer: the "
            "mean of its patch tokens). Stage indices such as `2,3,4` (0 = first, -1 = last stage): those "
            "stages only. Helps when the pictures are far from the pretraining ones (digits, scans, medical, "
            "satellite); costs no extra forward pass, wider features (a slower fit) and a probe-folder export."
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
        self.feature_layers = parse_feature_layers(self.feature_layers)
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
    argv: list[str] | None = None,
    prog: str = "hf-finetune probe",
    default_config: str | None = None,
    extra_types: tuple = (),
    unused_in_config=None,
):
    """(model_args, data_args, probe_args, training_args, *extra) from `--config` (else `default_config`) + flags.

    `unused_in_config` (keys, why): YAML keys left out and logged (see `config_loading.parse_args`);
    `parse_train_args` passes the gradient strategies' settings, which a recipe's YAML run with `--strategy
    probe` may hold (`freeze_batchnorm`, ...)."""
    from hf_finetune.config_loading import parse_args

    return parse_args(
        (ModelArguments, DataArguments, ProbeRunArguments, FinetuneTrainingArguments, *extra_types),
        argv,
        prog=prog,
        default_config=default_config,
        unused_in_config=unused_in_config,
    )
