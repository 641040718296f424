"""Flip test-time augmentation (`tta_flip: true`): each evaluated picture is also seen as its mirror image.

The prediction is the mean of the class probabilities of the picture and of its horizontal mirror (the
evaluation pixels, exactly what the image processor gives, flipped left to right). It costs one more
prediction pass over the split, and is reported beside the plain figures with a `_tta` suffix
(`test_accuracy_tta`): the saved model is the plain one, and what `pipeline()` gives is the plain figure.
Use it only for classes a mirror image does not change (photographs of objects, faces; not digits or text).
"""

from __future__ import annotations

import numpy as np


def softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def flip_averaged_probabilities(logits, flipped_logits) -> np.ndarray:
    """The mean of the class probabilities of the pictures and of their mirror images."""
    return (softmax(logits) + softmax(flipped_logits)) / 2


class FlippedSplit:
    """A transformed split whose `pixel_values` are mirrored left to right (a torch map-style dataset)."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    @staticmethod
    def _flipped(example: dict) -> dict:
        return {**example, "pixel_values": example["pixel_values"].flip(-1)}

    def __getitem__(self, index):
        return self._flipped(self.split[index])

    def __getitems__(self, indices):
        return [self._flipped(example) for example in self.split.__getitems__(list(indices))]


def flip_tta_metrics(trainer, split, predictions, prefix: str) -> dict[str, float]:
    """The split's metrics under flip TTA, as `<prefix>_<metric>_tta` (`predictions`: the plain pass's
    `trainer.predict` output on `split`)."""
    from transformers import EvalPrediction

    logits = (
        predictions.predictions[0] if isinstance(predictions.predictions, tuple) else predictions.predictions
    )
    flipped = trainer.predict(FlippedSplit(split), metric_key_prefix=f"{prefix}_flipped").predictions
    flipped = flipped[0] if isinstance(flipped, tuple) else flipped
    probabilities = flip_averaged_probabilities(logits, flipped)
    # Log-probabilities rank the classes as the probabilities do: the metrics take them as logits.
    metrics = trainer.compute_metrics(EvalPrediction(np.log(probabilities), predictions.label_ids))
    return {f"{prefix}_{name}_tta": float(value) for name, value in metrics.items()}
