"""What trains, at which learning rate, from which epoch: the registry of gradient-path strategies.

A strategy is a name in :data:`STRATEGIES` (the ``strategy`` setting). It decides, for every block group
of the architecture (``hf_finetune.models.architectures.block_map``: embeddings, blocks, final norm, head), the
epoch from which that group trains (or never) and its learning-rate factor:

- ``full`` (default): everything trains.
- ``head``: only the classifier trains.
- ``last_n``: the top ``unfreeze_last_n`` blocks, the final norm and the head train.
- ``gradual``: starts as ``head``; every ``unfreeze_every`` epochs one more block group unfreezes, top down
  (the final norm together with the top block, the embeddings last), as ULMFiT / fastai do.
- ``llrd``: everything trains at ``learning_rate x layer_decay ** depth``, depth counted from the head
  (head and final norm 0, top block 1, ..., embeddings ``num_blocks + 1``), as BEiT / timm's
  ``--layer-decay`` do.
- ``lora``: the checkpoint is wrapped in peft LoRA adapters (``hf_finetune.strategies.lora``); only the
  adapters and the head train, every base weight (and BatchNorm statistic) stays as in the checkpoint.

The first five live in ``blockwise.py``, ``lora`` in ``lora.py``; each registers itself here with
:func:`register_strategy`, and ``arguments.py`` imports them all so that the settings know every name.
How a strategy becomes a per-parameter plan is ``plan.py``; the optimizer's groups ``param_groups.py``; the
Trainer side (unfreezing at epoch starts, DDP re-wrap) ``trainer.py``, ``ddp.py`` and ``callbacks.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from hf_finetune.strategies.arguments import StrategyArguments

# What every gradient-path run writes into output_dir: the plan, its groups and what happened to them.
STRATEGY_SUMMARY = "strategy_summary.json"

# Not a gradient strategy, so not in STRATEGIES: `train.run` hands it to the frozen-feature path (probe/).
FEATURE_STRATEGY = "probe"
FEATURE_STRATEGY_DESCRIPTION = (
    "nothing trains by gradient: frozen features computed once, a classic classifier on them"
)
# Not a strategy of its own either: `strategies.auto` measures, then runs one of the others (or the probe).
AUTO_STRATEGY = "auto"
AUTO_STRATEGY_DESCRIPTION = (
    "the probe, then the way expected to score best on validation that fits `time_budget_minutes` (lp_ft, "
    "full, llrd, last_n or the probe, from timed steps); the decision and its evidence go into the card"
)


@dataclass(frozen=True)
class Strategy:
    """One ``strategy`` value: a plan per block group, in input-to-output order.

    ``plan(groups, args)`` returns ``{group: (start_epoch | None, lr_factor)}``; ``None`` means frozen for
    the whole run. ``trains_everything`` strategies read ``train_modules`` as a restriction (adding to
    everything would be a no-op); the others add what it matches to what they train.
    """

    name: str
    description: str
    plan: Callable[[list[str], StrategyArguments], dict[str, tuple[int | None, float]]]
    needs_block_map: bool = True
    trains_everything: bool = False
    # Whether a re-initialised head trains beside a pretrained body from the start or soon after (full, llrd,
    # last_n, gradual): then an unset head_lr_multiplier is NEW_HEAD_LR_MULTIPLIER, so that the head catches up.
    new_head_catches_up: bool = False
    # Optional hooks. wrap_model: the model the strategy trains, built from the checkpoint's (lora: wrapped in
    # adapters). trains_parameter: only parameters it accepts train. details: an extra summary section.
    wrap_model: Callable[[nn.Module, StrategyArguments], nn.Module] | None = None
    trains_parameter: Callable[[str], bool] | None = None
    details: Callable[[nn.Module, StrategyArguments], dict[str, Any]] | None = None


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str,
    description: str,
    needs_block_map: bool = True,
    trains_everything=False,
    new_head_catches_up: bool = False,
    **hooks,
):
    """Decorator adding a plan function to :data:`STRATEGIES` under ``name`` (``hooks``: see :class:`Strategy`)."""

    def add(plan):
        STRATEGIES[name] = Strategy(
            name, description, plan, needs_block_map, trains_everything, new_head_catches_up, **hooks
        )
        return plan

    return add


# The head's learning-rate factor where head_lr_multiplier is unset and a new head trains beside a pretrained
# body. At learning_rate alone (a rate that keeps the pretrained features, e.g. 2e-4) a random head barely moves
# in a short run: on the real EfficientNet-Lite0, 8 photo classes, one epoch of 10 steps, test accuracy was
# 0.994 / 0.881 / 0.994 over 3 seeds at x1 and 1.000 on each at x10 (README, "Ways to transfer").
NEW_HEAD_LR_MULTIPLIER = 10.0


def head_lr_multiplier(args: StrategyArguments, new_head: bool) -> float:
    """The head's learning-rate factor: head_lr_multiplier when set, else NEW_HEAD_LR_MULTIPLIER for a new
    head in a strategy that trains the body too, else 1 (a kept or probe-fitted head; `head`, where
    learning_rate is the head's own rate; lora; from_scratch, where nothing is pretrained)."""
    if args.head_lr_multiplier is not None:
        return args.head_lr_multiplier
    caught_up = new_head and STRATEGIES[args.strategy].new_head_catches_up
    return NEW_HEAD_LR_MULTIPLIER if caught_up else 1.0


def head_factor(group: str, args: StrategyArguments) -> float:
    """The learning-rate factor ``head_lr_multiplier`` gives ``group`` (1 for every group but the head; an
    unset multiplier, which `plan.plan_strategy` resolves before planning, counts as 1)."""
    return (args.head_lr_multiplier or 1.0) if group == "head" else 1.0
