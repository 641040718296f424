"""The Trainer callbacks of a strategy run: the unfreezing history kept in checkpoints, and the epoch hooks.

Imported only when the Trainer is built (``trainer.strategy_trainer_class``): ``transformers``' callback
module stays out of the settings' import path.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class UnfreezingHistory(TrainerCallback, ExportableState):
    """The plan's history, saved in every checkpoint's ``trainer_state.json`` and restored by the Trainer on
    resume (``restore_callback_states_from_checkpoint``), so ``strategy_summary.json`` lists every epoch."""

    def __init__(self, entries: list | None = None):
        self.entries = list(entries or [])

    def state(self) -> dict:
        return {"args": {"entries": self.entries}, "attributes": {}}


class StrategyCallback(TrainerCallback):
    """Hands the Trainer's train / epoch events to its :class:`~hf_finetune.strategies.trainer.StrategyTrainerMixin`."""

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
