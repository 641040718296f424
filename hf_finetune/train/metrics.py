"""Metrics through `evaluate`, resolved from modules bundled with the package so that no network is needed.

`evaluate.load("accuracy")` fetches a script from the Hub; `evaluate.load(<folder>)` runs the same kind of
module from disk. The bundled modules compute exactly what the Hub's do (scikit-learn underneath).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

METRIC_MODULES = Path(__file__).parent / "metric_modules"
TOP_K = 5


@cache
def load_metric(name: str):
    """Load a bundled `evaluate` metric module by name (accuracy, f1, top_k_accuracy)."""
    import evaluate

    folder = METRIC_MODULES / name
    if not (folder / f"{name}.py").is_file():
        known = sorted(p.name for p in METRIC_MODULES.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise ValueError(f"no bundled metric {name!r}; bundled metrics are {known}")
    return evaluate.load(str(folder))


def classification_metrics(logits, labels, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 and, with more than `TOP_K` classes, top-5 accuracy."""
    import numpy as np

    logits = np.asarray(logits)
    labels = np.asarray(labels)
    predictions = logits.argmax(axis=-1)
    results = {}
    results.update(load_metric("accuracy").compute(predictions=predictions, references=labels))
    results["macro_f1"] = load_metric("f1").compute(
        predictions=predictions, references=labels, average="macro", labels=list(range(num_labels))
    )["f1"]
    if num_labels > TOP_K:
        results.update(load_metric("top_k_accuracy").compute(predictions=logits, references=labels, k=TOP_K))
    return results


class ComputeMetrics:
    """`Trainer(compute_metrics=...)` adapter; multi-label data gets `train.multilabel`'s metrics."""

    def __init__(self, num_labels: int, multi_label: bool = False):
        self.num_labels = num_labels
        self.multi_label = multi_label
        if multi_label:
            return
        # Load the metric modules now, while the Trainer is being built: `import evaluate` and the module loads
        # take about a second, which would otherwise land inside the first evaluation and the training time.
        for name in ("accuracy", "f1", "top_k_accuracy") if num_labels > TOP_K else ("accuracy", "f1"):
            load_metric(name)

    def __call__(self, eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        if self.multi_label:
            from hf_finetune.train.multilabel import multi_label_metrics

            return multi_label_metrics(logits, eval_prediction.label_ids)
        return classification_metrics(logits, eval_prediction.label_ids, self.num_labels)
