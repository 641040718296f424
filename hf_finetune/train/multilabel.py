"""Multi-label metrics and decision thresholds (scikit-learn underneath).

Scores are one sigmoid per label. The ranking metric is mAP: the mean over labels of each label's average
precision (labels with no positive picture in the split are left out of the mean, as they have no AP). The
decision metrics (micro / macro F1, subset accuracy: the share of pictures whose whole label set is right)
are given at 0.5 and at per-label thresholds chosen on the validation split, each the score that maximises
that label's F1 there (`choose_thresholds`). The thresholds are saved in config.json as
`multi_label_thresholds` (aligned with id2label), which `hf-finetune predict` applies.
"""

from __future__ import annotations

THRESHOLDS_KEY = "multi_label_thresholds"
DEFAULT_THRESHOLD = 0.5


def sigmoid(logits):
    import numpy as np

    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def per_label_average_precision(scores, targets):
    """Average precision of each label (NaN for a label with no positive picture)."""
    import numpy as np
    from sklearn.metrics import average_precision_score

    targets = np.asarray(targets) > 0.5
    return np.array(
        [
            average_precision_score(targets[:, j], scores[:, j]) if targets[:, j].any() else np.nan
            for j in range(targets.shape[1])
        ]
    )


def mean_average_precision(scores, targets) -> float:
    """mAP: the mean of the labels' average precisions, over the labels with a positive picture (NaN when
    none has one). Ranks only, so logits and sigmoid scores give the same value."""
    import numpy as np

    ap = per_label_average_precision(np.asarray(scores), targets)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def decision_metrics(scores, targets, thresholds, suffix: str = "") -> dict[str, float]:
    """Micro / macro F1 and subset accuracy of the labels whose score reaches `thresholds`."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    predicted = np.asarray(scores) >= np.asarray(thresholds)
    targets = np.asarray(targets) > 0.5
    return {
        f"micro_f1{suffix}": float(f1_score(targets, predicted, average="micro", zero_division=0)),
        f"macro_f1{suffix}": float(f1_score(targets, predicted, average="macro", zero_division=0)),
        f"subset_accuracy{suffix}": float(accuracy_score(targets, predicted)),
    }


def multi_label_metrics(logits, targets, thresholds=None) -> dict[str, float]:
    """mAP, and the decision metrics at 0.5 (and at `thresholds`, keys ending `_at_thresholds`)."""
    scores = sigmoid(logits)
    results = {"mAP": mean_average_precision(scores, targets)}
    results.update(decision_metrics(scores, targets, DEFAULT_THRESHOLD))
    if thresholds is not None:
        results.update(decision_metrics(scores, targets, thresholds, "_at_thresholds"))
    return results


def choose_thresholds(logits, targets) -> list[float]:
    """Per label, the score threshold with the best F1 on these (validation) predictions; 0.5 for a label
    with no positive picture. A threshold sits halfway between the chosen score and the next lower one, so
    that it does not hang on one picture's exact score."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    scores = sigmoid(logits)
    targets = np.asarray(targets) > 0.5
    thresholds = []
    for j in range(targets.shape[1]):
        if not targets[:, j].any():
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        precision, recall, cuts = precision_recall_curve(targets[:, j], scores[:, j])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        best = int(np.argmax(f1))
        lower = scores[:, j][scores[:, j] < cuts[best]]
        threshold = (cuts[best] + lower.max()) / 2 if len(lower) else cuts[best]
        thresholds.append(float(threshold))
    return thresholds


def per_label_report(logits, targets, label_names, thresholds) -> list[dict]:
    """Per label: precision, recall, F1 at its threshold, AP and the number of positive pictures."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    scores = sigmoid(logits)
    truth = np.asarray(targets) > 0.5
    predicted = scores >= np.asarray(thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, zero_division=0)
    ap = per_label_average_precision(scores, truth)
    return [
        {
            "label": name,
            "threshold": round(float(thresholds[j]), 4),
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "average_precision": None if np.isnan(ap[j]) else float(ap[j]),
            "support": int(support[j]),
        }
        for j, name in enumerate(label_names)
    ]


def evaluate_multi_label(trainer, splits, train_metrics: dict, train: bool = True):
    """A multi-label run's evaluation: validation predictions, the thresholds chosen on them, every split's
    metrics at 0.5 and at the thresholds. Returns (sections, report split's predictions, its name, thresholds)."""
    validation = trainer.predict(splits["validation"], metric_key_prefix="eval")
    thresholds = choose_thresholds(first_array(validation.predictions), validation.label_ids)
    sections = [("train", train_metrics)] if train else []
    parts = [("eval", "validation", validation)]
    report_split, predictions = "validation", validation
    if "test" in splits:
        report_split, predictions = "test", trainer.predict(splits["test"], metric_key_prefix="test")
        parts.append(("test", "test", predictions))
    for prefix, split, output in parts:
        tuned = multi_label_metrics(first_array(output.predictions), output.label_ids, thresholds)
        metrics = {**output.metrics, **{f"{prefix}_{k}": v for k, v in tuned.items()}}
        sections.append((prefix, {**metrics, f"{prefix}_samples": len(splits[split])}))
    for name, part in sections:
        trainer.log_metrics(name, part)
    return sections, predictions, report_split, thresholds


def first_array(predictions):
    """The logits of a prediction output: a model that returns more than logits gives a tuple, logits first."""
    return predictions[0] if isinstance(predictions, tuple) else predictions
