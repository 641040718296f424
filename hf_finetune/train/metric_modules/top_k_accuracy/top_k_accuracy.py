"""Top-k accuracy as an `evaluate` module: the true class is among the k highest-scoring ones."""

import datasets
import evaluate
import numpy as np


class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Proportion of examples whose true class is among the k largest scores.",
            citation="",
            inputs_description="predictions: per-class scores (list of float); references: class ids (int); k.",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, references, k=5):
        scores = np.asarray(predictions)
        top = np.argsort(-scores, axis=1)[:, :k]
        return {f"top{k}_accuracy": float((top == np.asarray(references)[:, None]).any(axis=1).mean())}
