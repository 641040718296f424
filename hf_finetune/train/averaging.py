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
