"""F1 as an `evaluate` module, bundled so that it loads with no network (same maths as the Hub's)."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall; `average='macro'` weighs every class equally.",
            citation="",
            inputs_description="predictions and references: class ids (int); average, labels as in scikit-learn.",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(
        self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None
    ):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=0,
        )
        return {"f1": float(score) if np.ndim(score) == 0 else np.asarray(score).tolist()}
