"""The validation split evaluated once per model: the final validation metrics and the calibration's logits come
from the per-epoch evaluation of the weights the run ends with, when the Trainer already made it.

A run evaluates validation at every epoch; at the end it needs validation's metrics and logits (for the
temperature of `train.calibration`) of the final model. When that model is the one the last (or, with the
best-model reload, the best) per-epoch evaluation saw, evaluating it again gives the same numbers at the cost
of a whole pass over the split; otherwise (EMA or WiSE-FT weights, a best checkpoint whose pass is not kept,
evaluation by steps that missed the last step) validation is predicted once more, once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ValidationPass:
    """One evaluation of the validation split: at which step, its metrics (as `Trainer.evaluate` returns them)
    and its model outputs."""

    step: int
    metrics: dict[str, Any]
    predictions: Any
    label_ids: Any


class KeepValidationPassesMixin:
    """Mixed into the run's Trainer: keeps the validation passes of `evaluate` that a final evaluation could
    reuse, the last and the best by `metric_for_best_model` (two arrays of N x labels at most)."""

    validation_passes: dict[int, ValidationPass]

    def evaluation_loop(self, dataloader, *args, **kwargs):
        output = super().evaluation_loop(dataloader, *args, **kwargs)
        self._last_loop_output = output
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        self._last_loop_output = None
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        output = self._last_loop_output
        of_validation = eval_dataset is None or eval_dataset is self.eval_dataset
        if (
            output is not None
            and of_validation
            and metric_key_prefix == "eval"
            and output.predictions is not None
        ):
            self._keep(
                ValidationPass(self.state.global_step, dict(metrics), output.predictions, output.label_ids)
            )
        return metrics

    def _keep(self, new: ValidationPass) -> None:
        passes = getattr(self, "validation_passes", {})
        key = f"eval_{self.args.metric_for_best_model or 'loss'}".replace("eval_eval_", "eval_")
        higher = self.args.greater_is_better if self.args.greater_is_better is not None else "loss" not in key

        def score(p: ValidationPass) -> float:
            value = float(p.metrics.get(key, 0.0))
            return value if higher else -value

        best = max(passes.values(), key=score, default=None)
        kept = {new.step: new}
        if best is not None and best.step != new.step and score(best) >= score(new):
            kept[best.step] = best
        self.validation_passes = kept


def checkpoint_step(path: str | None) -> int | None:
    match = re.search(r"checkpoint-(\d+)$", str(path or "").rstrip("/"))
    return int(match.group(1)) if match else None


def reusable_pass(trainer, weights_replaced: bool) -> ValidationPass | None:
    """The kept pass of the weights the model holds now, or None. `weights_replaced`: something besides the
    Trainer set the weights after training (the EMA or WiSE-FT choice)."""
    passes = getattr(trainer, "validation_passes", None)
    if weights_replaced or not passes:
        return None
    step = trainer.state.global_step
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        step = checkpoint_step(trainer.state.best_model_checkpoint)
    return passes.get(step)


def validation_metrics_and_outputs(trainer, validation, weights_replaced: bool = False):
    """(metrics, predictions, label_ids) of the final model on validation: the per-epoch pass that evaluated these
    weights when there is one, else one `predict` (logged like `evaluate`, so the log history reads the same)."""
    kept = reusable_pass(trainer, weights_replaced)
    if kept is not None:
        logger.info(
            "Validation: the evaluation at step %d is of the final weights; its metrics and logits are used "
            "instead of evaluating the split again.",
            kept.step,
        )
        metrics = dict(kept.metrics)
        if trainer.state.epoch is not None:
            metrics["epoch"] = trainer.state.epoch
        return metrics, kept.predictions, kept.label_ids
    output = trainer.predict(validation, metric_key_prefix="eval")
    metrics = dict(output.metrics)
    trainer.log(metrics)  # adds the epoch, and the entry evaluate() would have left in the log history
    return metrics, output.predictions, output.label_ids
