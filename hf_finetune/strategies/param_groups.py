"""The optimizer's parameter groups of a freezing plan: per block group and decay, with the plan's learning rates.

Only trainable parameters enter the optimizer (no state, no weight decay for frozen ones). A group is one
(block group, decay / no decay, learning-rate factor), head first, so that the Trainer's logged
``learning_rate`` (group 0's) is the head's. Groups that an unfreezing adds join at the schedule's current
factor, and the scheduler is extended to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hf_finetune.compat import extend_scheduler

if TYPE_CHECKING:
    from torch import nn

    from hf_finetune.strategies.plan import FreezingPlan


@dataclass(frozen=True)
class GroupSettings:
    """The Trainer's settings every group is built from."""

    learning_rate: float
    weight_decay: float
    decay_names: frozenset[str]  # the parameters weight decay applies to (the Trainer's own split)


def param_groups(
    plan: FreezingPlan, model: nn.Module, names, settings: GroupSettings
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for parameters ``names``: one per (block group, decay / no decay), head
    first, so that the Trainer's logged ``learning_rate`` (group 0's) is the head's."""
    names = set(names)
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if name in names:
            buckets.setdefault((plan.params[name].group, name in settings.decay_names), []).append(
                (name, param)
            )
    order = list(reversed(plan.groups))
    result = []
    for (group, decay), members in sorted(
        buckets.items(), key=lambda kv: (order.index(kv[0][0]), not kv[0][1])
    ):
        factors = {plan.params[n].lr_factor for n, _ in members}
        for factor in sorted(factors, reverse=True):  # one group per factor (regexes may mix them)
            params = [p for n, p in members if plan.params[n].lr_factor == factor]
            label = f"{group}/{'decay' if decay else 'no_decay'}"
            if len(factors) > 1:
                label += f"/x{factor:g}"
            result.append(
                {
                    "params": params,
                    "lr": settings.learning_rate * factor,
                    "weight_decay": settings.weight_decay if decay else 0.0,
                    "group_name": label,
                }
            )
    return result


def optimizer_groups_at(
    plan: FreezingPlan, model: nn.Module, epoch: int, settings: GroupSettings
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups once ``epoch`` has been entered, in the order a run adds them:
    epoch 0's groups, then those of each unfreezing. A resumed run's optimizer then matches the state
    saved in its checkpoint group by group (``load_state_dict`` pairs groups by position)."""
    starts = sorted({p.start for p in plan.params.values() if p.start is not None and p.start <= epoch})
    return [
        group
        for start in starts
        for group in param_groups(
            plan, model, [n for n, p in plan.params.items() if p.start == start], settings
        )
    ]


def add_param_groups(optimizer, scheduler, groups: list[dict[str, Any]]) -> None:
    """Add ``groups`` to a running optimizer at the schedule's current factor, and extend ``scheduler`` to them."""
    reference = optimizer.param_groups[0]
    # The schedule's current factor (warmup, cosine...), shared by all groups: new groups join at it.
    factor = reference["lr"] / reference["initial_lr"] if reference.get("initial_lr") else 1.0
    for group in groups:
        group["initial_lr"] = group["lr"]
        group["lr"] = group["initial_lr"] * factor
        optimizer.add_param_group(group)
        # Without this the new groups would keep their first learning rate for the rest of the run.
        extend_scheduler(scheduler, group["initial_lr"], group["lr"])
