"""Weight averaging after training: a uniform soup of the last checkpoints, and WiSE-FT interpolation.

- Uniform soup (Wortsman et al., "Model soups", ICML 2022): the mean of the weights of the last k epoch
  checkpoints of one run. Neighbouring checkpoints of one fine-tuning run lie in one basin, so their mean is a
  model of its own, often better than any of them, at no inference cost.
- WiSE-FT (Wortsman et al., CVPR 2022): theta(alpha) = (1 - alpha) * theta_start + alpha * theta_end, between
  the weights training started from (for LP-FT: the backbone with the fitted probe in its head) and the
  fine-tuned ones; alpha is chosen on the validation split.

Both give an ordinary state dict of the model's own keys, so the result is saved as any checkpoint is.
Floating-point tensors are averaged; integer buffers (BatchNorm's `num_batches_tracked`) are taken from the
last state, as averaging a count means nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def snapshot(model) -> dict:
    """A copy of `model`'s state dict that later training steps do not change."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def uniform_soup(states: Sequence[dict]) -> dict:
    """The element-wise mean of several state dicts with the same keys and shapes."""
    if not states:
        raise ValueError("a soup needs at least one state dict")
    keys = set(states[0])
    for n, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            missing = sorted(keys ^ set(state))[:5]
            raise ValueError(f"state dict {n} has other keys than the first (e.g. {missing}): not one model")
    soup = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            soup[key] = sum(state[key].double() for state in states).div(len(states)).to(last.dtype)
        else:
            soup[key] = last.clone()
    return soup


def interpolate(start: dict, end: dict, alpha: float) -> dict:
    """(1 - alpha) * start + alpha * end for floating-point tensors; the end's value for the others."""
    if set(start) != set(end):
        raise ValueError("start and end have other keys: not one model")
    return {
        key: (
            start[key].to(value.dtype).lerp(value, float(alpha))
            if value.is_floating_point()
            else value.clone()
        )
        for key, value in end.items()
    }


def choose_interpolation(
    start: dict, end: dict, evaluate: Callable[[dict], float], alphas: Sequence[float] = DEFAULT_ALPHAS
) -> tuple[float, dict, dict[float, float]]:
    """The alpha whose interpolated weights score best under `evaluate` (higher is better; ties go to the
    larger alpha, i.e. nearer the fine-tuned weights). Returns (alpha, its state, every alpha's score)."""
    scores = {float(alpha): float(evaluate(interpolate(start, end, alpha))) for alpha in alphas}
    best = max(scores, key=lambda alpha: (scores[alpha], alpha))
    logger.info(
        "WiSE-FT: validation scores by alpha %s; keeping alpha %.2f.",
        ", ".join(f"{a:.2f}: {s:.4f}" for a, s in scores.items()), best,
    )  # fmt: skip
    return best, interpolate(start, end, best), scores


# --------------------------------------------------------------------------------------------------------
# The choices at the end of training, made on validation with the Trainer's own evaluation
# --------------------------------------------------------------------------------------------------------
def validation_score(trainer, eval_dataset, metric: str = "eval_accuracy") -> float:
    return trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix="eval")[metric]


def keep_if_better(trainer, candidate: dict, eval_dataset, metric: str = "eval_accuracy"):
    """Scores `trainer.model` as it is and with the `candidate` state on validation; the candidate stays only
    when it scores higher (a tie keeps the current weights). Returns (candidate kept, current, candidate)."""
    current_state = snapshot(trainer.model)
    current = validation_score(trainer, eval_dataset, metric)
    trainer.model.load_state_dict(candidate, strict=True)
    score = validation_score(trainer, eval_dataset, metric)
    kept = score > current
    if not kept:
        trainer.model.load_state_dict(current_state, strict=True)
    return kept, current, score


def check_soup_strategy(soup_last_k: int, strategy: str) -> None:
    from hf_finetune.errors import UserError

    if soup_last_k and strategy == "lora":
        raise UserError(
            "soup_last_k averages whole-model checkpoints, but strategy lora checkpoints its adapters only. "
            "Set soup_last_k: 0 with lora."
        )


def choose_soup(trainer, output_dir, k: int, eval_dataset, metric: str = "eval_accuracy") -> dict:
    """The uniform soup of the last `k` complete checkpoints of `output_dir` (the epoch ends), kept in
    `trainer.model` when it scores better on validation than the weights there. Returns the figures."""
    from hf_finetune.train.checkpoints import COMPLETE_MARKER, checkpoint_dirs, checkpoint_state_dict

    newest = [path for path in checkpoint_dirs(output_dir) if (path / COMPLETE_MARKER).is_file()][:k]
    names = [path.name for path in reversed(newest)]  # oldest first
    if len(newest) < 2:
        logger.warning(
            "Soup: %d complete checkpoint(s) in %s, fewer than 2; no soup made.", len(newest), output_dir
        )
        return {"soup_used": False, "soup_checkpoints": ", ".join(names)}
    if len(newest) < k:
        logger.warning(
            "Soup: only %d of the %d checkpoints asked for are there; averaging those.", len(newest), k
        )
    # Oldest first: the integer buffers (BatchNorm's counts) come from the newest, the last state.
    soup = uniform_soup([checkpoint_state_dict(trainer.model, path) for path in reversed(newest)])
    kept, current, score = keep_if_better(trainer, soup, eval_dataset, metric)
    name = metric.removeprefix("eval_")
    logger.info(
        "Uniform soup of %s: validation %s %.4f against %.4f; keeping the %s.",
        ", ".join(names), name, score, current, "soup" if kept else "weights as they were",
    )  # fmt: skip
    return {"soup_used": kept, f"eval_soup_{name}": score, "soup_checkpoints": ", ".join(names)}


def choose_wise_ft(trainer, start_state: dict, eval_dataset, metric: str = "eval_accuracy") -> dict:
    """WiSE-FT: the interpolation between the LP-FT start and the trained weights that scores best on
    validation becomes the model. Returns the chosen alpha and its validation score for the results."""
    model = trainer.model

    def score(state):
        model.load_state_dict(state, strict=True)
        return validation_score(trainer, eval_dataset, metric)

    alpha, state, scores = choose_interpolation(start_state, snapshot(model), score)
    model.load_state_dict(state, strict=True)
    return {"wise_ft_alpha": alpha, f"eval_wise_ft_{metric.removeprefix('eval_')}": scores[alpha]}


def weights_chosen(results: dict) -> dict | None:
    """Which weights became the model (EMA, soup, WiSE-FT choices) and the validation scores they rest on
    (accuracy, or mAP for multi-label runs), from a run's results; None when the run made no such choice."""
    if not any(key in results for key in ("ema_used", "soup_used", "wise_ft_alpha")):
        return None
    metric = "mAP" if any(key.startswith("eval_") and key.endswith("_mAP") for key in results) else "accuracy"
    chosen, scores = "the trained weights", {}
    if "ema_used" in results:
        scores.update(trained=results[f"eval_raw_{metric}"], ema=results[f"eval_ema_{metric}"])
        chosen = "the EMA of the weights" if results["ema_used"] else chosen
    if f"eval_soup_{metric}" in results:
        scores["soup"] = results[f"eval_soup_{metric}"]
        if results["soup_used"]:
            chosen = f"the uniform soup of {results['soup_checkpoints']}"
    if "wise_ft_alpha" in results:
        alpha = results["wise_ft_alpha"]
        scores[f"wise_ft alpha {alpha:g}"] = results[f"eval_wise_ft_{metric}"]
        if alpha < 1.0:
            chosen = f"WiSE-FT, {alpha:g} x ({chosen}) + {1 - alpha:g} x the LP-FT start"
    return {"chosen": chosen, "metric": metric, f"validation_{metric}": scores}


def card_text(choice: dict) -> str:
    """The model card's Weights section."""
    metric = choice.get("metric", "accuracy")
    rows = "\n".join(f"| {name} | {score:.4f} |" for name, score in choice[f"validation_{metric}"].items())
    return (
        f"The saved model is {choice['chosen']}, chosen on the validation split:\n\n"
        f"| candidate | validation {metric} |\n|---|---|\n{rows}"
    )
