"""The Trainer a run trains with: our checkpoint reloads, exact-resume callbacks, metrics and collator, the
strategy's optimizer groups, and the speed and batch settings it is sized from."""

from __future__ import annotations

import logging

from hf_finetune.config import apply_global_batch_size, global_batch_description

logger = logging.getLogger(__name__)


def build_trainer(
    model,
    training_args,
    splits,
    image_processor,
    num_labels: int,
    callbacks=None,
    plan=None,
    channels_last=False,
    train_label_ids=None,
    multi_label: bool = False,
):
    from transformers import EarlyStoppingCallback, Trainer

    from hf_finetune.compat import use_per_batch_mean_losses
    from hf_finetune.data.transforms import Collator
    from hf_finetune.strategies.trainer import strategy_trainer_class
    from hf_finetune.train.checkpoints import CheckpointLoadingMixin, CompleteCheckpointCallback
    from hf_finetune.train.ema import EmaCallback
    from hf_finetune.train.losses import ClassificationLoss, MultiLabelLoss, inverse_frequency_weights
    from hf_finetune.train.metrics import ComputeMetrics
    from hf_finetune.train.mixing import BatchMixing, MixingSettings, MixingTrainerMixin
    from hf_finetune.train.resume import AugmentationEpochCallback, StepSeedCallback
    from hf_finetune.train.sampling import BalancedSamplerMixin
    from hf_finetune.train.streamed import StreamingLoaderMixin, StreamPositionCallback
    from hf_finetune.train.validation_pass import KeepValidationPassesMixin

    callbacks = list(callbacks or [])
    if getattr(training_args, "early_stopping_patience", None):
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    # With a freezing plan, the Trainer builds its optimizer groups and unfreezing schedule from it.
    base_cls, extra = (strategy_trainer_class(), {"plan": plan}) if plan is not None else (Trainer, {})
    mixing = MixingSettings(
        training_args.mixup_alpha,
        training_args.cutmix_alpha,
        training_args.mix_prob,
        training_args.mix_switch_prob,
    )
    class_weights = None
    if multi_label:
        refuse_for_multi_label(training_args)
        # Always our loss: BCE on the multi-hot targets, whatever the checkpoint's own loss would do.
        extra["compute_loss_func"] = MultiLabelLoss(training_args.label_smoothing_factor)
    elif training_args.class_weights == "auto":
        class_weights = inverse_frequency_weights(train_label_ids, num_labels)
        logger.info(
            "Class weights (inverse class frequency in train): %s", [round(w, 3) for w in class_weights]
        )
    if not multi_label and (mixing.enabled or class_weights is not None):
        # Soft targets and weights need our loss; it applies label_smoothing_factor itself.
        extra["compute_loss_func"] = ClassificationLoss(training_args.label_smoothing_factor, class_weights)
    # KeepValidationPassesMixin: the final evaluation reuses the per-epoch pass of the final weights.
    mixins = (
        KeepValidationPassesMixin, CheckpointLoadingMixin, MixingTrainerMixin, BalancedSamplerMixin,
        StreamingLoaderMixin,
    )  # fmt: skip
    trainer_cls = type("FinetuneTrainer", (*mixins, base_cls), {})
    if training_args.ema:
        # Before the completeness marker: a checkpoint is complete once its EMA copy is written too.
        callbacks.append(EmaCallback(training_args.ema_decay, training_args.ema_warmup))
    callbacks.append(CompleteCheckpointCallback())
    # Exact resume (hf_finetune.train.resume): each step's random stream and each picture's augmentation are derived
    # from the seed, so a resumed run draws what the uninterrupted one drew.
    callbacks.append(StepSeedCallback(training_args.seed))
    if hasattr(splits["train"], "set_epoch"):
        callbacks.append(AugmentationEpochCallback(splits["train"]))
    if hasattr(splits["train"], "skip_batches"):  # a stream: where a resumed run starts reading
        callbacks.append(StreamPositionCallback(splits["train"]))
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=Collator(channels_last),
        compute_metrics=ComputeMetrics(num_labels, multi_label),
        processing_class=image_processor,
        callbacks=callbacks,
        **extra,
    )
    use_per_batch_mean_losses(trainer)  # else losses and gradients scale with the process count
    trainer.batch_mixing = BatchMixing(mixing, num_labels) if mixing.enabled else None
    if training_args.sampler == "balanced":
        trainer.balanced_label_ids = list(train_label_ids)
        logger.info("Balanced sampler: each of the %d classes drawn equally often per epoch.", num_labels)
    return trainer


def refuse_for_multi_label(training_args) -> None:
    """The settings that have no meaning for multi-label data stop the run with a clear message."""
    from hf_finetune.errors import UserError

    if training_args.class_weights == "auto":
        raise UserError(
            "class_weights=auto weighs each picture by its one class, and multi-label pictures have several. "
            "Set class_weights: none for multi-label data."
        )
    if training_args.cutmix_alpha > 0:
        raise UserError(
            f"cutmix_alpha={training_args.cutmix_alpha}: CutMix can cut a label's object out of a multi-label "
            "picture, so its area-weighted targets would be wrong. Use mixup_alpha for multi-label data, or set "
            "cutmix_alpha: 0."
        )


def selection_metric(training_args, multi_label: bool) -> str:
    """The validation metric that chooses between weights (best checkpoint, EMA, WiSE-FT): accuracy, or mAP
    for multi-label data when metric_for_best_model is left at its default (accuracy)."""
    if multi_label and training_args.metric_for_best_model in ("accuracy", "eval_accuracy"):
        training_args.metric_for_best_model = "mAP"
    name = training_args.metric_for_best_model or ("mAP" if multi_label else "accuracy")
    return name if name.startswith("eval_") else f"eval_{name}"


def assemble_trainer(model, plan, training_args, data, image_processor, callbacks=()):
    """Trainer: speed settings, the global batch size, and the Trainer with our callbacks and `callbacks`
    (`data`: the data stage's `RunData`)."""
    from hf_finetune.train.speed import apply_channels_last, log_input_pipeline

    channels_last = apply_channels_last(model, training_args)
    log_input_pipeline(training_args, channels_last)
    # Before the Trainer: it sizes its accumulation (and the steps per epoch) from these arguments.
    apply_global_batch_size(training_args)
    selection_metric(training_args, data.prepared.multi_label)  # mAP chooses the best multi-label checkpoint
    logger.info(global_batch_description(training_args))
    prepared = data.prepared
    # The only users of the training labels here: the class weights and the balanced sampler.
    weighted = training_args.class_weights == "auto" or training_args.sampler == "balanced"
    return build_trainer(
        model,
        training_args,
        data.splits,
        image_processor,
        len(prepared.labels),
        callbacks=list(callbacks),
        plan=plan,
        channels_last=channels_last,
        train_label_ids=prepared.splits["train"][prepared.label_column] if weighted else None,
        multi_label=prepared.multi_label,
    )
