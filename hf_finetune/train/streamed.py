"""Training on a stream (`streaming: true`): the settings it needs, the DataLoader the Trainer reads it through,
the resume position, and the unreadable samples counted at the end.

- A stream has no length, so the Trainer cannot work out the steps of an epoch: `max_steps` must be set, and
  schedules by epoch (`eval_strategy`, `save_strategy`, `logging_strategy`: epoch, this project's defaults)
  become schedules by steps at `save_steps` (capped at max_steps; `logging_steps` for logging).
- Settings that need the whole training split up front stop the run: `class_weights: auto` and
  `sampler: balanced` (its class counts), `soup_last_k` (epoch checkpoints), the probe, LP-FT and `auto`
  strategies (a feature pass over train) and `inspect`.
- The DataLoader: the stream is already this process's part (`data.stream_source`), so it is not handed to
  `accelerator.prepare`, which would deal out its batches among the processes once more (the Trainer moves each
  batch to the device itself). Its workers are the most (up to `dataloader_num_workers`) that divide the
  process's shard count: each reads as many shards, and none is left without one.
- Resume: the Trainer's own fast-forward (`skip_first_batches`, which decodes every skipped batch) is turned
  off (`ignore_data_skip`); `StreamPositionCallback` tells the stream how many batches the checkpoint had
  consumed, and the stream passes over them undecoded (`data.stream_train`).
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from hf_finetune.config import schedule_name
from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)


def check_streaming_settings(data_args, training_args, strategy_args, extra_args=()) -> None:
    """Stop a streamed run whose settings need what a stream cannot give, and adapt the schedules by epoch."""
    if not getattr(data_args, "streaming", False):
        return
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise UserError(
            "streaming: true needs max_steps (e.g. --max_steps 5000): a stream has no length, so the Trainer "
            "cannot tell how many steps an epoch or num_train_epochs is. Set max_steps to the optimizer steps "
            "to train (steps x global batch = pictures seen)."
        )
    refused = {
        "class_weights: auto": training_args.class_weights == "auto",
        "sampler: balanced": training_args.sampler == "balanced",
        f"soup_last_k: {training_args.soup_last_k}": bool(training_args.soup_last_k),
        f"strategy: {strategy_args.strategy}": strategy_args.strategy in ("probe", "lp_ft", "auto"),
        "inspect: true": any(getattr(a, "inspect", False) for a in extra_args),
    }
    named = [name for name, on in refused.items() if on]
    if named:
        raise UserError(
            f"streaming: true does not go with {', '.join(named)}: they need the whole training split (its class "
            "counts, epoch checkpoints or a feature pass) before training. Remove them, or set streaming: false."
        )
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    steps = training_args.save_steps
    interval = min(int(steps), training_args.max_steps) if steps >= 1 else steps
    if schedule_name(training_args.save_strategy) == "epoch":
        training_args.save_strategy, training_args.save_steps = SaveStrategy.STEPS, interval
    if schedule_name(training_args.eval_strategy) == "epoch":
        training_args.eval_strategy, training_args.eval_steps = (
            IntervalStrategy.STEPS,
            training_args.save_steps,
        )
    if schedule_name(training_args.logging_strategy) == "epoch":
        training_args.logging_strategy = IntervalStrategy.STEPS
        training_args.logging_steps = min(training_args.logging_steps, training_args.max_steps)
    training_args.ignore_data_skip = True  # the stream skips to its position itself, undecoded
    logger.info(
        "Streaming: %d steps; evaluation and checkpoints every %s steps",
        training_args.max_steps, training_args.save_steps,
    )  # fmt: skip


class StreamingLoaderMixin:
    """Trainer mixin: a `StreamedTrainSet` is read through a DataLoader of its own (module docstring)."""

    def get_train_dataloader(self):
        from torch.utils.data import DataLoader

        from hf_finetune.data.stream_train import StreamedTrainSet

        dataset = self.train_dataset
        if not isinstance(dataset, StreamedTrainSet):
            return super().get_train_dataloader()
        args = self.args
        dataset.batch_size = self._train_batch_size
        workers = dataset.workers_for(args.dataloader_num_workers)
        if workers < args.dataloader_num_workers:
            logger.info(
                "Streaming: %d dataloader worker(s) instead of %d: the most that divide this process's %d shard(s)",
                workers, args.dataloader_num_workers, dataset.n_shards,
            )  # fmt: skip
        return DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory,
            prefetch_factor=args.dataloader_prefetch_factor if workers else None,
            multiprocessing_context=args.dataloader_multiprocessing_context if workers else None,
        )


class StreamPositionCallback(TrainerCallback):
    """At the start of training (after a checkpoint's state is loaded), the stream learns how many batches were
    already consumed: `global_step` x `gradient_accumulation_steps`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_train_begin(self, args, state, control, **kwargs):
        self.dataset.skip_batches = state.global_step * args.gradient_accumulation_steps
        if self.dataset.skip_batches:
            logger.info("Streaming: resuming after %d batches of this process", self.dataset.skip_batches)


def streamed_train_metrics(trainer, output_dir) -> dict:
    """After training: the unreadable training samples of every process (unique), into bad_images.json and
    run_summary.json; returns the train metrics (`train_bad_samples_skipped`, `train_samples` seen)."""
    import json

    from accelerate.utils import gather_object

    from hf_finetune.data.stream_train import STREAM_BAD_DIR, StreamedTrainSet, bad_samples
    from hf_finetune.outputs import files as output

    dataset = trainer.train_dataset
    if not isinstance(dataset, StreamedTrainSet):
        return {}
    mine = bad_samples(output_dir / STREAM_BAD_DIR, trainer.args.process_index)
    everyone = gather_object([mine]) if trainer.args.world_size > 1 else [mine]
    bad = list({entry["image"]: entry for part in everyone for entry in part}.values())
    args = trainer.args
    seen = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
    if trainer.is_world_process_zero():
        path = output_dir / output.BAD_IMAGES
        earlier = json.loads(path.read_text()) if path.is_file() else []
        output.write_bad_images(output_dir, earlier + bad)
        summary = json.loads((output_dir / output.RUN_SUMMARY).read_text())
        output.add_to_run_summary(
            output_dir, {"bad_images_skipped": summary.get("bad_images_skipped", 0) + len(bad)}
        )
        if bad:
            logger.warning(
                "Streaming: skipped %d unreadable training picture(s), listed in bad_images.json", len(bad)
            )
    return {"train_bad_samples_skipped": len(bad), "train_samples": seen * args.world_size}
