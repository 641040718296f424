"""The Trainer side of a strategy: the optimizer from the plan, unfreezing at epoch starts, DDP re-wrap.

:func:`strategy_trainer_class` is ``transformers.Trainer`` with :class:`StrategyTrainerMixin`; the freezing
plan (``plan.py``) says what trains when, ``param_groups.py`` builds the optimizer's groups from it,
``ddp.py`` re-wraps DistributedDataParallel at each unfreeze, ``callbacks.py`` calls in at epoch starts.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any

from hf_finetune.errors import UserError
from hf_finetune.strategies.ddp import replicas_identical, rewrap_ddp
from hf_finetune.strategies.param_groups import (
    GroupSettings,
    add_param_groups,
    optimizer_groups_at,
    param_groups,
)

if TYPE_CHECKING:
    from hf_finetune.strategies.plan import FreezingPlan

logger = logging.getLogger(__name__)


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
        groups = optimizer_groups_at(self.plan, self.model, epoch, self._group_settings())
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
        from hf_finetune.strategies.callbacks import UnfreezingHistory

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
            add_param_groups(
                self.optimizer,
                self.lr_scheduler,
                param_groups(self.plan, self.model, newly, self._group_settings()),
            )
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

    def _group_settings(self) -> GroupSettings:
        return GroupSettings(
            self.args.learning_rate,
            self.args.weight_decay,
            frozenset(self.get_decay_parameter_names(self.model)),
        )

    def _rewrap_ddp(self) -> bool:
        """Under DDP, wrap the model in a new DDP whose buckets are the current trainable parameters."""
        new = rewrap_ddp(self.model_wrapped, self.model, self.accelerator)
        if new is None:
            return False
        self.model_wrapped = new
        self.plan.ddp["rewraps"] = self.plan.ddp.get("rewraps", 0) + 1
        return True

    def strategy_summary(self) -> dict[str, Any]:
        summary = self.plan.summary(self.model, self.args.learning_rate)
        if self.optimizer is not None:
            groups = self.optimizer.param_groups
            summary["optimizer_param_groups"] = "as at the end of training"
        else:
            groups = param_groups(self.plan, self.model, self.plan.trainable_at(0), self._group_settings())
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


@functools.cache
def strategy_trainer_class():
    """``transformers.Trainer`` with :class:`StrategyTrainerMixin`; built on first use so that importing this
    module does not import the Trainer."""
    from transformers import Trainer

    from hf_finetune.strategies.callbacks import StrategyCallback, UnfreezingHistory

    class StrategyTrainer(StrategyTrainerMixin, Trainer):
        def __init__(self, *args, plan: FreezingPlan, **kwargs):
            super().__init__(*args, **kwargs)
            self.plan = plan
            self.add_callback(StrategyCallback(self))
            self.add_callback(UnfreezingHistory())

    return StrategyTrainer
