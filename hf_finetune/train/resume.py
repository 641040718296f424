"""Exact resume: a run killed anywhere and started again ends with the uninterrupted run's weights.

What transformers' Trainer restores from a checkpoint by itself: the weights (through
`hf_finetune.train.checkpoints`), the optimizer and learning-rate scheduler state, the global step and epoch, the
shuffling order (accelerate's seedable sampler: epoch e's permutation comes from seed + e, and the batches
already trained on in the resumed epoch are skipped), and, with `restore_callback_states_from_checkpoint`
(on by default here), the early-stopping counter. A checkpoint is only ever written at an optimizer step, so
a kill in the middle of gradient accumulation resumes at that step's start.

What it does not restore exactly, and what this module does instead:
- The random stream of the main process. The Trainer reloads the RNG state saved with the checkpoint only
  after fetching the resumed epoch's first batch, and the uninterrupted run may have drawn from it after the
  save (an evaluation's DataLoader seed at the end of an epoch, for instance). `StepSeedCallback` seeds
  python / numpy / torch from (seed, global step) at the start of every optimizer step, so dropout and any
  other draw in a step are the same whatever happened before it.
- The augmentation in dataloader workers, whose random state a checkpoint does not hold (skipped batches
  shift it). Each picture's augmentation is a pure function of (seed, epoch, sample index)
  (`hf_finetune.data.transforms.SeededAugmentation`); `AugmentationEpochCallback` tells the training set the
  epoch.
- What was restored is not said anywhere; `ResumeReport` logs it.
"""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback

from hf_finetune.data.transforms import derived_seed

logger = logging.getLogger(__name__)

STEP_STREAM = 0  # first word after the seed in every step's seed (transforms.AUGMENTATION_STREAM is 1)


def epoch_of(state) -> int:
    """The epoch in progress at an epoch start: state.epoch is the number of epochs done (fractional after a
    mid-epoch resume: 1.4 is the second epoch, 4 of its 10 steps done)."""
    return math.floor(float(state.epoch or 0) + 1e-6)


class StepSeedCallback(TrainerCallback):
    """Seeds python, numpy and torch from (seed, global step) at the start of every optimizer step."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_step_begin(self, args, state, control, **kwargs):
        from transformers import set_seed

        # Every process gets the same seed, as the Trainer's own set_seed(args.seed) gives them.
        set_seed(derived_seed(self.seed, STEP_STREAM, state.global_step))
        return control


class AugmentationEpochCallback(TrainerCallback):
    """Sets the epoch on the training set (a `SeededTrainSet`) at each epoch start, before its batches are
    requested. (accelerate's `DataLoaderShard.set_epoch` forwards the epoch to a dataset only when the sampler
    chain has no `set_epoch` of its own, so it cannot be relied on for this.)"""

    def __init__(self, train_set):
        self.train_set = train_set

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.train_set.set_epoch(epoch_of(state))
        return control


class ResumeReport(TrainerCallback):
    """Logs where a resumed run continues from and what was restored, once the Trainer has loaded it all."""

    def __init__(self, checkpoint: str | None):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, lr_scheduler=None, train_dataloader=None, **kwargs):
        if self.checkpoint is None or not state.is_world_process_zero:
            return control
        if train_dataloader is not None and not hasattr(train_dataloader.dataset, "__len__"):
            logger.info(  # a stream (streaming: true): it has no epochs, only a position
                "Resuming from %s: global step %d of %d. Restored: model weights; optimizer and learning-rate "
                "scheduler state; the stream's position (the batches before it are passed over undecoded).",
                self.checkpoint, state.global_step, state.max_steps,
            )  # fmt: skip
            return control
        batches = len(train_dataloader) if train_dataloader is not None else 0
        accumulation = args.gradient_accumulation_steps
        per_epoch = max(math.ceil(batches / accumulation), 1)
        epoch = state.global_step // per_epoch
        done = state.global_step % per_epoch
        restored = [
            "model weights",
            "optimizer and learning-rate scheduler state"
            + (
                f" (learning rate now {lr_scheduler.get_last_lr()[0]:.6g})"
                if lr_scheduler is not None
                else ""
            ),
            f"the shuffling order (epoch {epoch}'s permutation; its first {done * accumulation} "
            "batch(es), already trained on, are skipped)"
            if done
            else "the shuffling order",
        ]
        early = state.stateful_callbacks.get("EarlyStoppingCallback")
        if early and args.restore_callback_states_from_checkpoint:
            early = early[0] if isinstance(early, list) else early
            counter = early.get("attributes", {}).get("early_stopping_patience_counter")
            patience = early.get("args", {}).get("early_stopping_patience")
            restored.append(
                f"early-stopping counter {counter} of {patience} (best metric {state.best_metric})"
            )
        logger.info(
            "Resuming from %s: global step %d of %d, epoch %.4g (%d of %d step(s) done in epoch %d; epochs count "
            "from 0, %d in all). Restored: %s. Derived again, not stored: each picture's augmentation (from seed, "
            "epoch and index) and each step's random stream (from seed and step).",
            self.checkpoint,
            state.global_step,
            state.max_steps,
            float(state.epoch or 0),
            done,
            per_epoch,
            epoch,
            math.ceil(state.num_train_epochs),
            "; ".join(restored),
        )
        return control
