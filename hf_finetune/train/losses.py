"""The training loss: cross-entropy on hard or soft targets, with label smoothing and class weights; binary
cross-entropy for multi-label data (`MultiLabelLoss`).

One function serves every regularisation that changes the targets: MixUp / CutMix give soft targets (a
probability row per picture), `label_smoothing_factor` blends them with the uniform distribution, and
`class_weights` weighs each picture's loss by its class. It is passed to the Trainer as `compute_loss_func`,
which hands it the model's outputs and the batch's labels (popped before the forward pass).

Normalisation: the Trainer counts the labels of every micro-batch of an optimizer step (`num_items_in_batch`,
``labels != -100``) and, with a `compute_loss_func`, no longer divides by the accumulation steps. So the loss
here is a sum over the micro-batch divided by the number of pictures in the whole step; for soft targets the
Trainer's count is pictures x classes, and is divided back by the number of classes. With class weights, the
weighted sum is divided by the number of pictures (not by the sum of the weights, as `cross_entropy`'s mean
would be), so that micro-batches of an accumulated step add up to the same loss as one large batch.
"""

from __future__ import annotations

from collections.abc import Sequence


def inverse_frequency_weights(label_ids: Sequence[int], num_labels: int) -> list[float]:
    """Per-class loss weights n / (k * n_c), k the classes present: 1.0 for each when they are balanced.

    A class with no training picture gets weight 0 (it contributes no loss either way) rather than infinity.
    """
    counts = [0] * num_labels
    for label in label_ids:
        counts[int(label)] += 1
    total = sum(counts)
    present = sum(1 for c in counts if c)
    return [total / (present * c) if c else 0.0 for c in counts]


class ClassificationLoss:
    """`compute_loss_func` for the Trainer: cross-entropy with optional smoothing, soft targets and weights."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.class_weights = list(class_weights) if class_weights is not None else None

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch

        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # float32 whatever the autocast dtype
        soft = labels.is_floating_point()
        num_classes = log_probs.shape[-1]
        targets = labels.float() if soft else torch.nn.functional.one_hot(labels, num_classes).float()
        if self.label_smoothing:
            targets = (1 - self.label_smoothing) * targets + self.label_smoothing / num_classes
        if self.class_weights is not None:
            targets = targets * torch.tensor(self.class_weights, device=targets.device)
        per_picture = -(targets * log_probs).sum(-1)
        if num_items_in_batch is None:  # evaluation: one batch at a time
            return per_picture.mean()
        pictures = num_items_in_batch / num_classes if soft else num_items_in_batch
        if isinstance(pictures, torch.Tensor):
            pictures = pictures.to(per_picture.device)
        return per_picture.sum() / pictures


class MultiLabelLoss:
    """`compute_loss_func` for multi-label data: binary cross-entropy on the logits (one sigmoid per label).

    Targets are 0/1 float rows (MixUp makes them fractions: the mixed picture shows each label in proportion).
    `label_smoothing` pulls each target towards 1/2 (0 -> s/2, 1 -> 1 - s/2). The Trainer counts every element
    of the float targets (pictures x labels) in `num_items_in_batch`, so the sum divided by it is the mean per
    picture and label, whatever the accumulation.
    """

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch

        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs[0]).float()
        targets = labels.float()
        if self.label_smoothing:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / 2
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if num_items_in_batch is None:
            return losses.mean()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch
