"""What trains, at which learning rate, from which epoch: the gradient-path fine-tuning strategies.

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
- ``lora``: the checkpoint is wrapped in peft LoRA adapters (``hf_finetune.strategies.lora``); only the adapters and
  the head train, every base weight (and BatchNorm statistic) stays as in the checkpoint.

``train_modules`` / ``freeze_modules`` (regular expressions searched in parameter names) refine any
strategy and need no block map, so they also cover architectures the block map does not know:
``train_modules`` adds to what ``head`` / ``last_n`` / ``gradual`` train and, with the strategies that
train everything (``full``, ``llrd``), restricts training to what it matches; ``freeze_modules`` wins
over everything.
``head_lr_multiplier`` scales the head's learning rate in every strategy.

"Frozen" means the intent, not a learning rate of 0: ``requires_grad=False`` (no gradient is computed or
stored), absent from the optimizer (no state, no weight decay), and every BatchNorm inside a frozen part
held in eval mode (a forward pre-hook, so the Trainer's ``model.train()`` at every step cannot undo it) so
its running statistics do not move. ``train_bn`` keeps BatchNorm affine parameters trainable, as fastai
does; the statistics stay frozen all the same.

DistributedDataParallel is configured from the plan instead of with a blanket
``find_unused_parameters=True``: frozen parameters have ``requires_grad=False``, which DDP leaves out of
its gradient buckets, and the plan freezes the few parameters no forward pass uses (e.g. DINOv2's
``mask_token``, found by one probing forward/backward), so every parameter DDP reduces receives a gradient
at every step and ``find_unused_parameters=False`` is correct. ``gradual`` changes the trainable set
while training; DDP fixes its buckets when it wraps the model, so at each unfreeze the trainer wraps the
model in a new DDP (see :class:`StrategyTrainerMixin`). Without that, DDP raises nothing: the newly
unfrozen parameters are simply never all-reduced and the processes' replicas drift apart, which is why
every epoch ends with a replica fingerprint check recorded in the summary.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_finetune.errors import UserError
from hf_finetune.models.architectures import collapse_to_modules
from hf_finetune.strategies.lora import is_adapter_parameter, unwrap

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

STRATEGY_SUMMARY = "strategy_summary.json"


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------
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
    # Optional hooks. wrap_model: the model the strategy trains, built from the checkpoint's (lora: wrapped in
    # adapters). trains_parameter: only parameters it accepts train. details: an extra summary section.
    wrap_model: Callable[[nn.Module, StrategyArguments], nn.Module] | None = None
    trains_parameter: Callable[[str], bool] | None = None
    details: Callable[[nn.Module, StrategyArguments], dict[str, Any]] | None = None


STRATEGIES: dict[str, Strategy] = {}

# Not a gradient strategy, so not in STRATEGIES: `training.run` hands it to the frozen-feature path (probe.py).
FEATURE_STRATEGY = "probe"
FEATURE_STRATEGY_DESCRIPTION = (
    "nothing trains by gradient: frozen features computed once, a classic classifier on them"
)


def register_strategy(
    name: str, description: str, needs_block_map: bool = True, trains_everything=False, **hooks
):
    """Decorator adding a plan function to :data:`STRATEGIES` under ``name`` (``hooks``: see :class:`Strategy`)."""

    def add(plan):
        STRATEGIES[name] = Strategy(name, description, plan, needs_block_map, trains_everything, **hooks)
        return plan

    return add


def _blocks(groups: list[str]) -> list[str]:
    return [g for g in groups if g.startswith("block_")]


def _head_factor(group: str, args: StrategyArguments) -> float:
    return args.head_lr_multiplier if group == "head" else 1.0


@register_strategy("full", "everything trains", needs_block_map=False, trains_everything=True)
def _plan_full(groups, args):
    return {g: (0, _head_factor(g, args)) for g in groups}


@register_strategy("head", "only the classifier head trains")
def _plan_head(groups, args):
    return {g: (0 if g == "head" else None, _head_factor(g, args)) for g in groups}


@register_strategy("last_n", "the top `unfreeze_last_n` blocks, the final norm and the head train")
def _plan_last_n(groups, args):
    blocks = _blocks(groups)
    if args.unfreeze_last_n > len(blocks):
        raise UserError(
            f"unfreeze_last_n={args.unfreeze_last_n} but this model has only {len(blocks)} blocks "
            f"({blocks[0]}..{blocks[-1]}). Use a number from 0 to {len(blocks)}, or strategy `full`."
        )
    top = set(blocks[len(blocks) - args.unfreeze_last_n :]) | {"final_norm", "head"}
    return {g: (0 if g in top else None, _head_factor(g, args)) for g in groups}


def gradual_units(groups: list[str]) -> list[list[str]]:
    """The block groups of ``gradual`` in unfreezing order: unit ``k`` unfreezes at ``k x unfreeze_every``.

    Head first; then the top block with the final norm (so that stage k equals ``last_n`` with n=k); then
    each lower block; the embeddings last.
    """
    blocks = _blocks(groups)
    units = [["head"]]
    if blocks:
        units.append([g for g in ("final_norm", blocks[-1]) if g in groups])
        units += [[b] for b in reversed(blocks[:-1])]
    elif "final_norm" in groups:
        units.append(["final_norm"])
    if "embeddings" in groups:
        units.append(["embeddings"])
    return units


@register_strategy(
    "gradual", "starts as `head`, one more block group unfreezes every `unfreeze_every` epochs, top down"
)
def _plan_gradual(groups, args):
    start = {g: k * args.unfreeze_every for k, unit in enumerate(gradual_units(groups)) for g in unit}
    return {g: (start[g], _head_factor(g, args)) for g in groups}


def llrd_depth(groups: list[str]) -> dict[str, int]:
    """Depth below the head, timm's layer ids reversed: head and final norm 0, top block 1, embeddings last."""
    blocks = _blocks(groups)
    depth = {"head": 0, "final_norm": 0, "embeddings": len(blocks) + 1}
    depth.update({b: len(blocks) - i for i, b in enumerate(blocks)})
    return {g: depth[g] for g in groups}


@register_strategy(
    "llrd",
    "everything trains at learning_rate x layer_decay**depth from the head down",
    trains_everything=True,
)
def _plan_llrd(groups, args):
    depth = llrd_depth(groups)
    return {g: (0, args.layer_decay ** depth[g] * _head_factor(g, args)) for g in groups}


def _wrap_lora(model, args):
    from hf_finetune.strategies.lora import apply_lora  # imports peft: only when the strategy is used

    return apply_lora(model, args)


def _lora_details(model, args):
    from hf_finetune.strategies.lora import lora_summary

    return lora_summary(model, args)


@register_strategy(
    "lora",
    "low-rank adapters (peft, rank `lora_r`) on the attention / convolution layers and the head train",
    needs_block_map=False,
    wrap_model=_wrap_lora,
    trains_parameter=is_adapter_parameter,
    details=_lora_details,
)
def _plan_lora(groups, args):
    # Every group holds adapters; trains_parameter keeps the base weights inside them frozen.
    return {g: (0, _head_factor(g, args)) for g in groups}


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------
@dataclass
class StrategyArguments:
    """Which parameters train, when, and at which learning rate (see hf_finetune.strategies.core)."""

    strategy: str = field(
        default="full",
        # Built from the registry, so the help lists every registered strategy.
        metadata={
            "help": "What trains. "
            + "; ".join(f"{s.name}: {s.description}" for s in STRATEGIES.values())
            + f"; {FEATURE_STRATEGY}: {FEATURE_STRATEGY_DESCRIPTION}"
        },
    )
    unfreeze_last_n: int = field(
        default=2, metadata={"help": "last_n: how many of the top blocks train (0 = head + final norm)."}
    )
    unfreeze_every: int = field(default=1, metadata={"help": "gradual: epochs between two unfreezing steps."})
    layer_decay: float = field(
        default=0.75,
        metadata={"help": "llrd: learning-rate factor per block group from the head down, in (0, 1]."},
    )
    head_lr_multiplier: float = field(
        default=1.0,
        metadata={
            "help": "The head's learning rate relative to `learning_rate`, in every strategy (e.g. 10 with "
            "last_n or gradual to let the new head catch up)."
        },
    )
    freeze_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions searched in parameter names: matches never train (wins over "
            "everything else)."
        },
    )
    train_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions searched in parameter names: matches train from the start. Added "
            "to what head / last_n / gradual train; with full or llrd, only matches train."
        },
    )
    train_bn: bool = field(
        default=False,
        metadata={
            "help": "Keep BatchNorm weight and bias trainable inside frozen parts (fastai's train_bn); their "
            "running statistics stay frozen either way."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "lora: rank of each adapter's low-rank update."})
    lora_alpha: int = field(
        default=16, metadata={"help": "lora: scale of the update, applied as lora_alpha / lora_r."}
    )
    lora_dropout: float = field(
        default=0.1, metadata={"help": "lora: dropout on the adapters' input while training, in [0, 1)."}
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "lora: module names or name suffixes that get adapters, as in peft's target_modules (e.g. "
            "['query', 'value']). Default: the attention projections of ViT / DeiT / BEiT / DINOv2 / Swin, "
            "the pointwise Linear layers of ConvNeXt, the ungrouped convolutions in the blocks of ResNet / "
            "RegNet / MobileNetV2 / EfficientNet."
        },
    )
    lora_merge: bool = field(
        default=True,
        metadata={
            "help": "lora: write the merged standalone model to output_dir and the adapter to "
            "output_dir/adapter; false: output_dir holds the adapter only."
        },
    )

    def __post_init__(self):
        if self.strategy not in STRATEGIES and self.strategy != FEATURE_STRATEGY:
            names = [*STRATEGIES, FEATURE_STRATEGY]
            close = difflib.get_close_matches(str(self.strategy), names, n=1, cutoff=0.5)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise UserError(
                f"strategy={self.strategy!r} is not a known strategy.{hint} Valid strategies: "
                + "; ".join(f"`{s.name}` ({s.description})" for s in STRATEGIES.values())
                + f"; `{FEATURE_STRATEGY}` ({FEATURE_STRATEGY_DESCRIPTION})."
            )
        for name, low in (("unfreeze_last_n", 0), ("unfreeze_every", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise UserError(f"{name}={value!r} must be a whole number >= {low}.")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"layer_decay={self.layer_decay} must be in (0, 1], e.g. 0.75 (BEiT, timm).")
        if not self.head_lr_multiplier > 0:
            raise UserError(f"head_lr_multiplier={self.head_lr_multiplier} must be > 0, e.g. 1 or 10.")
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise UserError(f"lora_r={self.lora_r!r} must be a whole number >= 1, e.g. 8 or 16.")
        if not self.lora_alpha > 0:
            raise UserError(f"lora_alpha={self.lora_alpha} must be > 0, e.g. 16 (twice lora_r is common).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout={self.lora_dropout} must be in [0, 1), e.g. 0.1.")
        if self.lora_target_modules is not None and (
            not self.lora_target_modules
            or not all(isinstance(t, str) and t for t in self.lora_target_modules)
        ):
            raise UserError(
                f"lora_target_modules={self.lora_target_modules!r} must be a non-empty list of module names, "
                "e.g. ['query', 'value'], or left unset for the defaults."
            )
        if self.strategy == "lora" and (self.train_modules or self.train_bn):
            raise UserError(
                "strategy `lora` trains the adapters and the head, which is what its adapter file holds; "
                "train_modules / train_bn would train weights the adapter does not save. Add modules to "
                "lora_target_modules instead, or use another strategy."
            )
        for name in ("freeze_modules", "train_modules"):
            for pattern in getattr(self, name) or []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise UserError(
                        f"{name} entry {pattern!r} is not a valid regular expression ({err}). Escape dots "
                        "as `\\.`, e.g. `encoder\\.layer\\.11\\.`."
                    ) from None


# --------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------
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

    def optimizer_groups_at(
        self, model: nn.Module, epoch: int, learning_rate: float, weight_decay: float, decay_names
    ) -> list[dict[str, Any]]:
        """The optimizer's parameter groups once ``epoch`` has been entered, in the order a run adds them:
        epoch 0's groups, then those of each unfreezing. A resumed run's optimizer then matches the state
        saved in its checkpoint group by group (``load_state_dict`` pairs groups by position)."""
        starts = sorted({p.start for p in self.params.values() if p.start is not None and p.start <= epoch})
        return [
            group
            for start in starts
            for group in self.param_groups(
                model,
                [n for n, p in self.params.items() if p.start == start],
                learning_rate,
                weight_decay,
                decay_names,
            )
        ]

    def param_groups(
        self, model: nn.Module, names, learning_rate: float, weight_decay: float, decay_names
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups for parameters ``names``: one per (block group, decay / no decay),
        head first, so that the Trainer's logged ``learning_rate`` (group 0's) is the head's."""
        names, decay_names = set(names), set(decay_names)
        buckets: dict[tuple[str, bool], list] = {}
        for name, param in model.named_parameters():
            if name in names:
                buckets.setdefault((self.params[name].group, name in decay_names), []).append((name, param))
        order = list(reversed(self.groups))
        result = []
        for (group, decay), members in sorted(
            buckets.items(), key=lambda kv: (order.index(kv[0][0]), not kv[0][1])
        ):
            factors = {self.params[n].lr_factor for n, _ in members}
            for factor in sorted(factors, reverse=True):  # one group per factor (regexes may mix them)
                params = [p for n, p in members if self.params[n].lr_factor == factor]
                label = f"{group}/{'decay' if decay else 'no_decay'}"
                if len(factors) > 1:
                    label += f"/x{factor:g}"
                result.append(
                    {
                        "params": params,
                        "lr": learning_rate * factor,
                        "weight_decay": weight_decay if decay else 0.0,
                        "group_name": label,
                    }
                )
        return result

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
        schedule = []
        for epoch in self.unfreeze_epochs():
            groups = sorted(
                {p.group for p in self.params.values() if p.start == epoch}, key=list(self.groups).index
            )
            schedule.append({"epoch": epoch, "unfreezes": groups})
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
            "unfreezing_schedule": schedule,
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
    from torch import nn

    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        return {"body": ("",)}
    others = tuple(name for name, _ in model.named_children() if name != prefix)
    return {"body": (prefix,), "head": others} if others else {"body": (prefix,)}


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
    model: nn.Module, args: StrategyArguments, example_inputs: dict | None = None
) -> FreezingPlan:
    """The :class:`FreezingPlan` of ``args`` for ``model`` (nothing is changed on the model yet).

    ``example_inputs`` (a collated batch) lets the plan find and freeze parameters no forward uses, which
    is what allows DDP to run with ``find_unused_parameters=False``.
    """
    from torch import nn

    from hf_finetune.models.architectures import block_map

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
    if "head" not in groups and args.head_lr_multiplier != 1.0:
        raise UserError(
            f"head_lr_multiplier={args.head_lr_multiplier} needs the classifier head, and this model's head "
            "cannot be told apart from its body. Leave head_lr_multiplier at 1."
        )
    group_plan = strategy.plan(list(groups), args)
    names = [n for n, _ in model.named_parameters()]
    group_of = {n: _group_of(n, groups) for n in names}
    train = _matches(args.train_modules, names, "train_modules")
    freeze = _matches(args.freeze_modules, names, "freeze_modules")

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
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
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


def prepare_strategy(model: nn.Module, args: StrategyArguments, training_args=None, example_inputs=None):
    """Plan ``args`` for ``model``, apply its first epoch, and set what DDP needs in ``training_args``."""
    plan = plan_strategy(model, args, example_inputs)
    plan.apply(model, 0)
    plan.applied_epoch = 0
    if training_args is not None:
        configure_ddp(training_args, plan, probed=example_inputs is not None)
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
    for epoch in plan.unfreeze_epochs():
        groups = sorted(
            {p.group for p in plan.params.values() if p.start == epoch}, key=list(plan.groups).index
        )
        logger.info("Strategy `%s`: epoch %d unfreezes %s", args.strategy, epoch, ", ".join(groups))
    return plan


def configure_ddp(training_args, plan: FreezingPlan, probed: bool = True) -> None:
    """``find_unused_parameters=False`` unless the user chose otherwise or the plan could not be probed.

    DDP's unused-parameter error comes from a parameter in its buckets that gets no gradient. The plan
    makes that impossible: frozen parameters have ``requires_grad=False`` (DDP never buckets them), the
    parameters no forward uses are frozen, and ``gradual`` re-wraps the model at each unfreeze, so the
    buckets always hold exactly the trainable parameters. ``find_unused_parameters=True`` would cost a
    graph traversal every step and keep unused parameters silently in the gradient all-reduce.
    """
    chosen = training_args.ddp_find_unused_parameters
    if chosen is None and probed:
        training_args.ddp_find_unused_parameters = False
        reason = "derived from the freezing plan: every parameter DDP reduces gets a gradient every step"
    elif chosen is None:
        reason = "Trainer default (no example batch to check the forward pass with)"
    else:
        reason = "set by the user"
    plan.ddp = {
        "find_unused_parameters": training_args.ddp_find_unused_parameters,
        "why": reason,
        "rewrap_at_unfreeze": bool(plan.unfreeze_epochs()),
    }


# --------------------------------------------------------------------------------------------------------
# The trainer side
# --------------------------------------------------------------------------------------------------------
def _checkpoint_epoch(state) -> int:
    """The epoch whose trainable set the optimizer had when ``state`` was saved (0 on a fresh run).

    A checkpoint written during epoch e (its last step included) has state.epoch in (e, e + 1].
    """
    epoch = float(getattr(state, "epoch", 0) or 0)
    return max(0, math.ceil(epoch - 1e-6) - 1)


class StrategyTrainerMixin:
    """Mixed into ``transformers.Trainer`` by :func:`strategy_trainer_class`.

    - ``create_optimizer``: parameter groups from the plan (only trainable parameters; per-group learning
      rates; the Trainer's own weight-decay split).
    - at each epoch start (a callback): apply the plan's epoch; for newly trainable parameters add optimizer
      groups (at the scheduler's current factor, and extend the scheduler to them) and, under DDP, wrap the
      model in a new DistributedDataParallel so its buckets hold the new trainable set.
    - ``training_step``: the Trainer's loop keeps the wrapper it started with in a local variable, so a step
      that receives a retired wrapper runs on the current one instead.
    """

    plan: FreezingPlan

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return super().create_optimizer(model)
        epoch = _checkpoint_epoch(self.state)
        # On resume, the trainable set that the saved optimizer state belongs to; the next epoch start
        # then unfreezes what that epoch adds.
        self.plan.apply(self.model, epoch)
        self.plan.applied_epoch = epoch
        if self.state.global_step and self.plan.unfreeze_epochs():
            trained = [g for g, state in self.plan.group_state(self.model).items() if state != "frozen"]
            later = [e for e in self.plan.unfreeze_epochs() if e > epoch]
            logger.info(
                "Strategy `%s` resumes with the trainable set of epoch %d (%s); next unfreezing: %s",
                self.plan.args.strategy,
                epoch,
                ", ".join(trained),
                f"epoch {later[0]}" if later else "none",
            )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if special or _is_optimizer_factory(optimizer_cls):
            raise UserError(
                f"optim={self.args.optim} builds its own parameter groups, so the strategy cannot set which "
                "parameters train at which learning rate. Use optim adamw_torch (the default) or sgd."
            )
        groups = self.plan.optimizer_groups_at(
            self.model,
            epoch,
            self.args.learning_rate,
            self.args.weight_decay,
            self.get_decay_parameter_names(self.model),
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        logger.info(
            "Optimizer parameter groups: %s",
            "; ".join(f"{g['group_name']} lr={g['lr']:.3g} ({len(g['params'])} tensors)" for g in groups),
        )
        return self.optimizer

    def training_step(self, model, *args, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        current = self.model_wrapped
        if isinstance(model, DistributedDataParallel) and model is not current and model.module is self.model:
            # Keep gradient accumulation's no-sync micro-batches: the loop entered no_sync on the old wrapper.
            if not model.require_backward_grad_sync:
                with current.no_sync():
                    return super().training_step(current, *args, **kwargs)
            model = current
        return super().training_step(model, *args, **kwargs)

    # ---- called by _StrategyCallback -------------------------------------------------------------------
    def restore_history(self) -> None:
        """Continue the history saved with the checkpoint a run resumes from (an empty one on a fresh run)."""
        kept = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, UnfreezingHistory))
        self.plan.history = kept.entries  # the same list: what this run appends is saved with its checkpoints

    def note_wrapping(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        wrapped_in_ddp = isinstance(self.model_wrapped, DistributedDataParallel)
        self.plan.ddp["world_size"] = self.args.world_size
        self.plan.ddp["wrapped_in_ddp"] = wrapped_in_ddp
        if self.plan.unfreeze_epochs() and self.args.world_size > 1 and not wrapped_in_ddp:
            # Only DDP is re-wrapped at an unfreeze; FSDP / DeepSpeed fix their trainable set when they shard.
            raise UserError(
                f"Strategy `{self.plan.args.strategy}` changes which parameters train during the run, which "
                f"hf-finetune supports with DistributedDataParallel only, not {type(self.model_wrapped).__name__}. "
                "Use last_n or llrd (fixed trainable sets), or launch with a DDP accelerate config."
            )

    def enter_epoch(self, epoch: int) -> None:
        newly = self.plan.apply(self.model, epoch) if epoch != self.plan.applied_epoch else []
        self.plan.applied_epoch = epoch
        if self.plan.history and self.plan.history[-1]["epoch"] == epoch:
            return  # resumed inside this epoch: its start is already recorded (and nothing unfreezes now)
        unfrozen = sorted({self.plan.params[n].group for n in newly}, key=list(self.plan.groups).index)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        rewrapped = False
        if newly:
            self._add_param_groups(newly)
            rewrapped = self._rewrap_ddp()
            logger.info(
                "Epoch %d: unfroze %s (%s parameters now train)%s",
                epoch,
                ", ".join(unfrozen),
                f"{trainable:,}",
                "; DDP re-wrapped" if rewrapped else "",
            )
        self.plan.history.append(
            {
                "epoch": epoch,
                "global_step": self.state.global_step,
                "groups": self.plan.group_state(self.model),
                "newly_unfrozen": unfrozen,
                "trainable_parameters": trainable,
                "optimizer_parameters": sum(
                    p.numel() for g in self.optimizer.param_groups for p in g["params"]
                ),
                "learning_rates": {
                    g.get("group_name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)
                },
                "ddp_rewrapped": rewrapped,
            }
        )

    def leave_epoch(self) -> None:
        identical = replicas_identical(self.model)
        if identical is not None and self.plan.history:
            self.plan.history[-1]["replicas_identical"] = identical
            if not identical:
                logger.error(
                    "The processes' model replicas differ after this epoch: gradients were not synced."
                )

    def _add_param_groups(self, names: list[str]) -> None:
        groups = self.plan.param_groups(
            self.model,
            names,
            self.args.learning_rate,
            self.args.weight_decay,
            self.get_decay_parameter_names(self.model),
        )
        reference = self.optimizer.param_groups[0]
        # The schedule's current factor (warmup, cosine...), shared by all groups: new groups join at it.
        factor = reference["lr"] / reference["initial_lr"] if reference.get("initial_lr") else 1.0
        scheduler = self.lr_scheduler
        for group in groups:
            group["initial_lr"] = group["lr"]
            group["lr"] = group["initial_lr"] * factor
            self.optimizer.add_param_group(group)
            # A scheduler zips its per-group lists with the optimizer's groups: extend them, or the new groups
            # would keep their first learning rate for the rest of the run.
            for attr, value in (("base_lrs", group["initial_lr"]), ("_last_lr", group["lr"])):
                if isinstance(getattr(scheduler, attr, None), list):
                    getattr(scheduler, attr).append(value)
            for attr in ("lr_lambdas", "min_lrs"):
                if getattr(scheduler, attr, None):
                    getattr(scheduler, attr).append(getattr(scheduler, attr)[0])

    def _rewrap_ddp(self) -> bool:
        """Wrap the model in a new DDP whose buckets are the current trainable parameters."""
        from torch.nn.parallel import DistributedDataParallel

        old = self.model_wrapped
        if not isinstance(old, DistributedDataParallel):
            return False
        # The old reducer's hooks would otherwise still fire on the parameters it knew.
        old._remove_autograd_hooks()
        handler = self.accelerator.ddp_handler
        new = DistributedDataParallel(
            self.model,
            device_ids=old.device_ids,
            output_device=old.output_device,
            **(handler.to_kwargs() if handler is not None else {}),
        )
        if handler is not None:
            handler.register_comm_hook(new)
        self.accelerator._models = [new if m is old else m for m in self.accelerator._models]
        self.model_wrapped = new
        self.plan.ddp["rewraps"] = self.plan.ddp.get("rewraps", 0) + 1
        return True

    def strategy_summary(self) -> dict[str, Any]:
        summary = self.plan.summary(self.model, self.args.learning_rate)
        if self.optimizer is not None:
            groups = self.optimizer.param_groups
            summary["optimizer_param_groups"] = "as at the end of training"
        else:
            groups = self.plan.param_groups(
                self.model,
                self.plan.trainable_at(0),
                self.args.learning_rate,
                self.args.weight_decay,
                self.get_decay_parameter_names(self.model),
            )
            summary["optimizer_param_groups"] = "planned for the first epoch"
        summary["param_groups"] = [
            {
                "name": g.get("group_name", str(i)),
                "learning_rate": g.get("initial_lr", g["lr"]),
                "weight_decay": g["weight_decay"],
                "tensors": len(g["params"]),
                "parameters": sum(p.numel() for p in g["params"]),
            }
            for i, g in enumerate(groups)
        ]
        return summary


def _is_optimizer_factory(optimizer_cls) -> bool:
    try:
        from transformers.trainer import is_optimizer_factory
    except ImportError:  # older transformers have no optimizer factories
        return False
    return is_optimizer_factory(optimizer_cls)


def replicas_identical(model: nn.Module) -> bool | None:
    """Under torch.distributed, whether every process holds the same weights (None when not distributed).

    A cheap fingerprint (float64 sum and sum of squares of every parameter), compared with one all-reduce
    MIN and one MAX: if DDP missed a trainable parameter, the replicas drift apart. Buffers are left out:
    BatchNorm statistics legitimately differ after a step until DDP broadcasts rank 0's at the next forward.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    tensors = [p.detach() for p in model.parameters()]
    device = tensors[0].device if dist.get_backend() != "gloo" else torch.device("cpu")
    fingerprint = torch.stack(
        [torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]
    ).to(device)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


class UnfreezingHistory(TrainerCallback, ExportableState):
    """The plan's history, saved in every checkpoint's ``trainer_state.json`` and restored by the Trainer on
    resume (``restore_callback_states_from_checkpoint``), so ``strategy_summary.json`` lists every epoch."""

    def __init__(self, entries: list | None = None):
        self.entries = list(entries or [])

    def state(self) -> dict:
        return {"args": {"entries": self.entries}, "attributes": {}}


class _StrategyCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.restore_history()
        self.trainer.note_wrapping()

    def on_epoch_begin(self, args, state, control, **kwargs):
        from hf_finetune.train.resume import epoch_of

        self.trainer.enter_epoch(epoch_of(state))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.leave_epoch()


@functools.cache
def strategy_trainer_class():
    """``transformers.Trainer`` with :class:`StrategyTrainerMixin`; built on first use so that importing this
    module (the CLI does, for :class:`StrategyArguments`) does not import the Trainer."""
    from transformers import Trainer

    class StrategyTrainer(StrategyTrainerMixin, Trainer):
        def __init__(self, *args, plan: FreezingPlan, **kwargs):
            super().__init__(*args, **kwargs)
            self.plan = plan
            self.add_callback(_StrategyCallback(self))
            self.add_callback(UnfreezingHistory())

    return StrategyTrainer
