"""The freezing plan: for one model and one strategy, what trains from which epoch, at which learning rate.

:func:`plan_strategy` turns a registered strategy (``registry.py``) into a :class:`FreezingPlan`, one entry
per parameter, without touching the model; :func:`prepare_strategy` applies its first epoch.

"Frozen" means the intent, not a learning rate of 0: ``requires_grad=False`` (no gradient is computed or
stored), absent from the optimizer (no state, no weight decay), and every BatchNorm inside a frozen part
held in eval mode (a forward pre-hook, so the Trainer's ``model.train()`` at every step cannot undo it) so
its running statistics do not move. ``train_bn`` keeps BatchNorm affine parameters trainable, as fastai
does; the statistics stay frozen all the same. ``freeze_batchnorm`` does the opposite in every strategy: each
BatchNorm (weight, bias, statistics) stays as pretrained even where everything around it trains.

``train_modules`` / ``freeze_modules`` (regular expressions searched in parameter names) refine any
strategy and need no block map, so they also cover architectures the block map does not know:
``train_modules`` adds to what ``head`` / ``last_n`` / ``gradual`` train and, with the strategies that
train everything (``full``, ``llrd``), restricts training to what it matches; ``freeze_modules`` wins
over everything. ``head_lr_multiplier`` scales the head's learning rate in every strategy; unset, it is 10
for a re-initialised head beside a pretrained body (``registry.head_lr_multiplier``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from hf_finetune.errors import UserError
from hf_finetune.models.architectures import base_prefix, block_map, collapse_to_modules
from hf_finetune.strategies.ddp import ddp_settings
from hf_finetune.strategies.lora import unwrap
from hf_finetune.strategies.registry import STRATEGIES, head_lr_multiplier

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hf_finetune.strategies.arguments import StrategyArguments

logger = logging.getLogger(__name__)


@dataclass
class ParamPlan:
    group: str  # block-map group (embeddings, block_i, final_norm, head), or body / head without a map
    start: int | None  # first epoch it trains; None: frozen for the whole run
    lr_factor: float  # its learning rate is learning_rate x lr_factor


@dataclass
class FreezingPlan:
    """The per-parameter outcome of a strategy for one model, and what happened to it during training."""

    args: StrategyArguments
    groups: dict[str, tuple[str, ...]]  # group -> module names, input to output
    params: dict[str, ParamPlan]  # in model.named_parameters() order
    batchnorms: dict[str, int | None]  # BatchNorm module -> first epoch its statistics update (None: never)
    unused: list[str] = field(default_factory=list)  # parameters no forward pass uses: frozen
    history: list[dict[str, Any]] = field(default_factory=list)
    ddp: dict[str, Any] = field(default_factory=dict)
    applied_epoch: int | None = None  # the epoch whose trainable set is on the model now
    _bn_hooks: dict[str, Any] = field(default_factory=dict, repr=False)

    def trainable_at(self, epoch: int) -> set[str]:
        return {n for n, p in self.params.items() if p.start is not None and p.start <= epoch}

    def unfreeze_epochs(self) -> list[int]:
        starts = {p.start for p in self.params.values()} | set(self.batchnorms.values())
        return sorted(s for s in starts if s)

    def unfreezing_schedule(self) -> list[dict[str, Any]]:
        """``[{"epoch": e, "unfreezes": [groups]}]`` for every epoch after the first that unfreezes something."""
        return [
            {
                "epoch": epoch,
                "unfreezes": sorted(
                    {p.group for p in self.params.values() if p.start == epoch}, key=list(self.groups).index
                ),
            }
            for epoch in self.unfreeze_epochs()
        ]

    def apply(self, model: nn.Module, epoch: int) -> list[str]:
        """Set ``requires_grad`` and the BatchNorm eval hooks for ``epoch``; return newly trainable names."""
        trainable = self.trainable_at(epoch)
        newly = []
        for name, param in model.named_parameters():
            if name in trainable and not param.requires_grad:
                newly.append(name)
            param.requires_grad_(name in trainable)
        modules = dict(model.named_modules())
        for name, start in self.batchnorms.items():
            frozen = start is None or start > epoch
            if frozen and name not in self._bn_hooks:
                self._bn_hooks[name] = modules[name].register_forward_pre_hook(_keep_in_eval_mode)
            elif not frozen and name in self._bn_hooks:
                self._bn_hooks.pop(name).remove()
        return newly

    def group_state(self, model: nn.Module) -> dict[str, str]:
        """``train`` / ``frozen`` / ``partial`` per block group, read from ``requires_grad`` as it is now."""
        flags: dict[str, set[bool]] = {g: set() for g in self.groups}
        for name, param in model.named_parameters():
            flags[self.params[name].group].add(param.requires_grad)
        return {
            g: "partial" if len(f) > 1 else ("train" if True in f else "frozen")
            for g, f in flags.items()
            if f
        }

    def summary(self, model: nn.Module, learning_rate: float) -> dict[str, Any]:
        """What the run's ``strategy_summary.json`` holds (the trainer adds the optimizer's groups)."""
        counts = {n: p.numel() for n, p in model.named_parameters()}
        start = self.trainable_at(0)
        per_group: dict[str, list[str]] = {g: [] for g in self.groups}
        for name, plan in self.params.items():
            per_group[plan.group].append(name)
        block_groups = [
            {
                "group": group,
                "modules": list(modules),
                "parameters": sum(counts[n] for n in per_group[group]),
                # One value when the whole group shares it; all values when regexes or train_bn split it.
                "trains_from_epoch": _one_or_all(self.params[n].start for n in per_group[group]),
                "learning_rate": _one_or_all(
                    learning_rate * self.params[n].lr_factor for n in per_group[group]
                ),
            }
            for group, modules in self.groups.items()
        ]
        total = sum(counts.values())
        trainable = sum(counts[n] for n in start)
        strategy = STRATEGIES[self.args.strategy]
        details = {strategy.name: strategy.details(model, self.args)} if strategy.details else {}
        return {
            "strategy": self.args.strategy,
            "settings": asdict(self.args),
            "parameters": {
                "total": total,
                "trainable_at_start": trainable,
                "trainable_fraction_at_start": round(trainable / total, 6) if total else 0.0,
            },
            "frozen_modules_at_start": collapse_to_modules(model, set(counts) - start),
            "never_trained": collapse_to_modules(
                model, {n for n, p in self.params.items() if p.start is None}
            ),
            "block_groups": block_groups,
            "batchnorm_kept_in_eval": {
                name: "whole run" if s is None else f"until epoch {s}"
                for name, s in self.batchnorms.items()
                if s != 0
            },
            "unused_by_forward": self.unused,
            "unfreezing_schedule": self.unfreezing_schedule(),
            "history": self.history,
            "ddp": self.ddp,
            **details,
        }


def _one_or_all(values):
    distinct = sorted(set(values), key=lambda v: (v is None, v))
    return distinct[0] if len(distinct) == 1 else distinct or None


def _keep_in_eval_mode(module, _args):
    # Runs before every forward of a frozen BatchNorm: whatever model.train() set, use (and do not update)
    # the running statistics.
    module.training = False


# --------------------------------------------------------------------------------------------------------
# Building the plan
# --------------------------------------------------------------------------------------------------------
def _fallback_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Without a block map: the base model is ``body``, whatever sits beside it (the classifier) ``head``."""
    prefix = base_prefix(model).rstrip(".")
    if not prefix:
        return {"body": ("",)}
    others = tuple(name for name, _ in model.named_children() if name != prefix)
    return {"body": (prefix,), "head": others} if others else {"body": (prefix,)}


def batchnorm_classes() -> tuple[type, ...]:
    """torch's BatchNorm layers of every dimension (SyncBatchNorm and the lazy ones included), by their
    public names (the quantized ones of torch.ao are inference-only); tests/test_strategies.py checks that no
    class of torch.nn is missing."""
    from torch import nn

    return (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.LazyBatchNorm1d,
        nn.LazyBatchNorm2d,
        nn.LazyBatchNorm3d,
    )


def _group_of(name: str, groups: dict[str, tuple[str, ...]]) -> str:
    for group, modules in groups.items():
        if any(m == "" or name == m or name.startswith(m + ".") for m in modules):
            return group
    return "body"  # parameters directly on the model itself (no block map case)


def _matches(patterns: list[str] | None, names: list[str], setting: str) -> set[str]:
    """Parameter names matched by any of ``patterns``; a pattern matching nothing is a typo -> UserError."""
    matched: set[str] = set()
    for pattern in patterns or []:
        hits = {n for n in names if re.search(pattern, n)}
        if not hits:
            example = ", ".join(names[:2] + names[-2:])
            raise UserError(
                f"{setting} entry {pattern!r} matches no parameter of this model. Patterns are searched in "
                f"parameter names such as {example}; escape dots as `\\.`."
            )
        matched |= hits
    return matched


def unused_parameters(model: nn.Module, example_inputs: dict[str, torch.Tensor]) -> list[str]:
    """Parameters that take no part in a forward pass (DINOv2's ``mask_token``): they never get a gradient.

    One forward/backward in eval mode (so no BatchNorm statistic moves) with ``torch.autograd.grad``, which
    leaves every ``.grad`` untouched.
    """
    import torch

    named = list(model.named_parameters())
    flags = [p.requires_grad for _, p in named]
    was_training = model.training
    first = named[0][1]
    pixels = example_inputs["pixel_values"].to(device=first.device, dtype=first.dtype)
    model.eval()
    try:
        for _, param in named:
            param.requires_grad_(True)
        with torch.enable_grad():
            output = model(pixel_values=pixels)
            logits = output.logits if hasattr(output, "logits") else output
            grads = torch.autograd.grad(logits.float().sum(), [p for _, p in named], allow_unused=True)
    finally:
        for (_, param), flag in zip(named, flags, strict=True):
            param.requires_grad_(flag)
        model.train(was_training)
    return [name for (name, _), grad in zip(named, grads, strict=True) if grad is None]


def plan_strategy(
    model: nn.Module, args: StrategyArguments, example_inputs: dict | None = None, new_head: bool = False
) -> FreezingPlan:
    """The :class:`FreezingPlan` of ``args`` for ``model`` (nothing is changed on the model yet).

    ``example_inputs`` (a collated batch) lets the plan find and freeze parameters no forward uses, which
    is what allows DDP to run with ``find_unused_parameters=False``. ``new_head``: the head was re-initialised
    on a pretrained body, which an unset ``head_lr_multiplier`` reads (``registry.head_lr_multiplier``); the
    plan's ``args`` hold the multiplier used.
    """
    strategy = STRATEGIES[args.strategy]
    # A PEFT-wrapped model (lora) has its transformers model's block map, under the wrapper's name prefix.
    inner, prefix = unwrap(model)
    try:
        groups = dict(block_map(inner).groups())
    except UserError:
        if strategy.needs_block_map:
            raise
        groups = _fallback_groups(inner)
    groups = {
        g: tuple(prefix + m if m else prefix.rstrip(".") for m in modules) for g, modules in groups.items()
    }
    if args.head_lr_multiplier is None:
        # Unset: the new-head default where the head can be told apart, else 1 (nothing to scale).
        resolved = head_lr_multiplier(args, new_head) if "head" in groups else 1.0
        args = replace(args, head_lr_multiplier=resolved)
    elif "head" not in groups and args.head_lr_multiplier != 1.0:
        raise UserError(
            f"head_lr_multiplier={args.head_lr_multiplier} needs the classifier head, and this model's head "
            "cannot be told apart from its body. Leave head_lr_multiplier at 1."
        )
    group_plan = strategy.plan(list(groups), args)
    names = [n for n, _ in model.named_parameters()]
    group_of = {n: _group_of(n, groups) for n in names}
    train = _matches(args.train_modules, names, "train_modules")
    freeze = _matches(args.freeze_modules, names, "freeze_modules")
    bns = batchnorm_classes()
    if args.freeze_batchnorm:  # the weight, bias (and so, below, the statistics) of every BatchNorm
        freeze |= {
            f"{module_name}.{param_name}"
            for module_name, module in model.named_modules()
            if isinstance(module, bns)
            for param_name, _ in module.named_parameters(recurse=False)
        }

    def planned_start(name: str, group: str) -> int | None:
        start = group_plan[group][0]
        if strategy.trains_parameter is not None and not strategy.trains_parameter(name):
            start = None
        if args.train_modules:
            if strategy.trains_everything:
                start = start if name in train else None
            elif name in train:
                start = 0
        return None if name in freeze else start

    params = {
        n: ParamPlan(group_of[n], planned_start(n, group_of[n]), group_plan[group_of[n]][1]) for n in names
    }

    # BatchNorm statistics move only once the part around them trains: the plan of its weight, read before
    # train_bn (which makes the affine parameters, not the statistics, trainable).
    batchnorms = {}
    for module_name, module in model.named_modules():
        if isinstance(module, bns):
            weight = f"{module_name}.weight"
            batchnorms[module_name] = (
                params[weight].start if weight in params else planned_start(weight, _group_of(weight, groups))
            )
    if args.train_bn:
        for module_name, start in batchnorms.items():
            for suffix in ("weight", "bias"):
                name = f"{module_name}.{suffix}"
                if name in params and start != 0 and name not in freeze:
                    params[name].start = 0

    plan = FreezingPlan(args=args, groups=groups, params=params, batchnorms=batchnorms)
    if example_inputs is not None:
        plan.unused = unused_parameters(model, example_inputs)
        for name in plan.unused:
            params[name].start = None
    if not plan.trainable_at(0):
        raise UserError(
            f"Nothing trains at the start with strategy `{args.strategy}`"
            + (f" and freeze_modules={args.freeze_modules}" if args.freeze_modules else "")
            + ": loosen freeze_modules or pick another strategy."
        )
    return plan


def wrap_for_strategy(model: nn.Module, args: StrategyArguments) -> nn.Module:
    """The model that strategy ``args.strategy`` trains: ``model`` itself, or (lora) ``model`` in adapters."""
    strategy = STRATEGIES[args.strategy]
    return strategy.wrap_model(model, args) if strategy.wrap_model is not None else model


def prepare_strategy(
    model: nn.Module, args: StrategyArguments, training_args=None, example_inputs=None, new_head: bool = False
):
    """Plan ``args`` for ``model``, apply its first epoch, and set what DDP needs in ``training_args``."""
    plan = plan_strategy(model, args, example_inputs, new_head=new_head)
    if args.head_lr_multiplier is None and plan.args.head_lr_multiplier != 1.0:
        logger.info(
            "Strategy `%s`: the new head trains at %g x learning_rate beside the pretrained body "
            "(head_lr_multiplier unset; set it, e.g. to 1, to choose)",
            args.strategy,
            plan.args.head_lr_multiplier,
        )
    plan.apply(model, 0)
    plan.applied_epoch = 0
    if training_args is not None:
        plan.ddp = ddp_settings(
            training_args, probed=example_inputs is not None, rewraps=bool(plan.unfreeze_epochs())
        )
    counts = {n: p.numel() for n, p in model.named_parameters()}
    trainable = sum(counts[n] for n in plan.trainable_at(0))
    logger.info(
        "Strategy `%s`: %s of %s parameters train at the start (%.1f%%); frozen: %s%s",
        args.strategy,
        f"{trainable:,}",
        f"{sum(counts.values()):,}",
        100 * trainable / max(1, sum(counts.values())),
        ", ".join(collapse_to_modules(model, set(counts) - plan.trainable_at(0))) or "nothing",
        f"; never used by the forward pass, frozen: {', '.join(plan.unused)}" if plan.unused else "",
    )
    for step in plan.unfreezing_schedule():
        logger.info(
            "Strategy `%s`: epoch %d unfreezes %s", args.strategy, step["epoch"], ", ".join(step["unfreezes"])
        )
    return plan
