"""One training run: data + checkpoint -> Trainer -> metrics -> a complete, publishable output directory."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from hf_finetune.config import (
    DataArguments,
    FinetuneTrainingArguments,
    ModelArguments,
    apply_global_batch_size,
    global_batch_description,
)
from hf_finetune.config_resolved import expand_output_dir
from hf_finetune.outputs import atomic, card, manifest
from hf_finetune.outputs import files as output

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
):
    from transformers import EarlyStoppingCallback, Trainer

    from hf_finetune.data.transforms import Collator
    from hf_finetune.strategies.trainer import strategy_trainer_class
    from hf_finetune.train.checkpoints import CheckpointLoadingMixin, CompleteCheckpointCallback
    from hf_finetune.train.metrics import ComputeMetrics
    from hf_finetune.train.resume import AugmentationEpochCallback, StepSeedCallback

    callbacks = list(callbacks or [])
    if getattr(training_args, "early_stopping_patience", None):
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    # With a freezing plan, the Trainer builds its optimizer groups and unfreezing schedule from it.
    base_cls, extra = (strategy_trainer_class(), {"plan": plan}) if plan is not None else (Trainer, {})
    trainer_cls = type("FinetuneTrainer", (CheckpointLoadingMixin, base_cls), {})
    callbacks.append(CompleteCheckpointCallback())
    # Exact resume (hf_finetune.train.resume): each step's random stream and each picture's augmentation are derived
    # from the seed, so a resumed run draws what the uninterrupted one drew.
    callbacks.append(StepSeedCallback(training_args.seed))
    if hasattr(splits["train"], "set_epoch"):
        callbacks.append(AugmentationEpochCallback(splits["train"]))
    return trainer_cls(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=Collator(channels_last),
        compute_metrics=ComputeMetrics(num_labels),
        processing_class=image_processor,
        callbacks=callbacks,
        **extra,
    )


def prepare_output_dir(training_args) -> None:
    """Refuse to overwrite a finished run silently, and fail before any work when the folder is not writable.

    Nothing is removed here: a run removes what its predecessor wrote only once it is known to start
    (`start_output`), so that a run failing on its checkpoint, data or settings leaves the folder as it was.
    """
    from hf_finetune.errors import UserError

    output_dir = Path(training_args.output_dir)
    finished = manifest.finished_run(output_dir)
    if finished and not training_args.overwrite_output_dir:
        raise UserError(
            f"output_dir={output_dir} already holds a finished run ({manifest.ALL_RESULTS} with {finished}). "
            "Choose another output_dir, or set overwrite_output_dir: true to train again and replace it."
        )
    previous = manifest.read_manifest(output_dir) or {"entries": []}
    if (output_dir / card.CARD).is_file() and not finished and card.CARD not in previous["entries"]:
        raise UserError(
            f"output_dir={output_dir} holds a {card.CARD} that hf-finetune did not write, and a run writes its "
            "model card under that name. Choose another output_dir (e.g. --output_dir outputs/my_run) or move "
            "the file."
        )
    with training_args.main_process_first(desc="output directory"):
        # Checked without creating anything: a run that stops early (a bad id, bad data) leaves no folder.
        existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents) if p.exists())
        problem = None
        if not existing.is_dir():
            problem = f"{existing} is a file, not a folder"
        elif existing == output_dir.absolute():
            try:
                with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
                    pass
            except OSError as err:
                problem = err.strerror or str(err)
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable"
        if problem:
            raise UserError(
                f"Cannot write to output_dir={output_dir} ({problem}). Choose a folder you can write to, e.g. "
                "--output_dir outputs/my_run."
            )


def start_output(training_args) -> manifest.RunOutput | None:
    """The run is known to start: replace the previous run's files (with `overwrite_output_dir`) and begin this
    run's manifest. Main process only writes; the others wait until it is done."""
    record = None
    with training_args.main_process_first(desc="replacing the previous run"):
        if training_args.should_save:
            record = manifest.RunOutput(training_args.output_dir)
            record.start(replace=training_args.overwrite_output_dir)
    return record


def prepare_trainer(model_args, data_args, training_args, strategy_args, dataset=None, train: bool = True):
    """Checkpoint, data, strategy and the Trainer built from them, exactly as a run uses them (nothing trains).

    `train=False` (evaluation only) makes no downscaled copies: each picture is decoded once either way.
    Returns (trainer, prepared data, transformed splits, the checkpoint's load report).
    """
    from hf_finetune.data.prepare import prepare_data
    from hf_finetune.data.transforms import attach_transforms, collate, decode_sizes
    from hf_finetune.models.loading import load_config, load_image_processor, load_model
    from hf_finetune.strategies.plan import prepare_strategy, wrap_for_strategy
    from hf_finetune.train.speed import apply_channels_last, log_input_pipeline

    # Checkpoint first: a wrong id fails in seconds, before any data is read.
    config = load_config(model_args)
    image_processor = load_image_processor(model_args)
    # The main process scans and caches the data first; the others then read its cache.
    downscale = decode_sizes(image_processor, data_args) if data_args.downscale_images and train else None
    with training_args.main_process_first(desc="dataset preparation"):
        data = prepare_data(
            data_args,
            training_args.seed,
            cache_dir=model_args.cache_dir,
            dataset=dataset,
            downscale=downscale,
        )
    model, load_report = load_model(model_args, data.labels, config)
    model = wrap_for_strategy(model, strategy_args)  # lora: the checkpoint in peft adapters
    splits = attach_transforms(
        data.splits, image_processor, data_args, data.image_column, data.label_column, training_args.seed
    )
    # Freeze before the Trainer exists: it reads ddp_find_unused_parameters when it builds the accelerator.
    # Two real training images let the plan find parameters the forward pass never uses.
    example = collate([splits["train"][i] for i in range(min(2, len(splits["train"])))])
    plan = prepare_strategy(model, strategy_args, training_args, example_inputs=example)
    channels_last = apply_channels_last(model, training_args)
    log_input_pipeline(training_args, channels_last)
    # Before the Trainer: it sizes its accumulation (and the steps per epoch) from these arguments.
    apply_global_batch_size(training_args)
    logger.info(global_batch_description(training_args))
    trainer = build_trainer(
        model,
        training_args,
        splits,
        image_processor,
        len(data.labels),
        plan=plan,
        channels_last=channels_last,
    )
    return trainer, data, splits, load_report


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FinetuneTrainingArguments,
    dataset=None,
    extra_args: tuple = (),
    strategy_args=None,
    train: bool = True,
) -> dict[str, Any]:
    """Train, evaluate on validation and test, and write the output directory. Returns all metrics.

    `strategy_args.strategy == "probe"` runs the frozen-feature path instead (`probe.run_probe`), with the
    probe settings of `strategy_args` when it is a `ProbeArguments` (as `parse_train_args` gives), else the
    probe's defaults.

    `train=False` evaluates and writes the checkpoint as it is (its labels must already be the data's): the
    "use the checkpoint as it is" way to transfer.
    """
    from transformers import set_seed

    from hf_finetune.strategies.arguments import StrategyArguments
    from hf_finetune.strategies.registry import FEATURE_STRATEGY, STRATEGY_SUMMARY
    from hf_finetune.train.checkpoints import last_complete_checkpoint
    from hf_finetune.train.resume import ResumeReport

    strategy_args = strategy_args or StrategyArguments()
    if strategy_args.strategy == FEATURE_STRATEGY:
        # The one strategy switch: `probe` is the frozen-feature path (features once, a classic classifier).
        from hf_finetune.probe.arguments import ProbeArguments, ProbeRunArguments
        from hf_finetune.probe.run import run_probe

        probe_args = strategy_args if isinstance(strategy_args, ProbeArguments) else ProbeRunArguments()
        return run_probe(model_args, data_args, probe_args, training_args, dataset=dataset)
    extra_args = (strategy_args, *(a for a in extra_args if not isinstance(a, StrategyArguments)))

    set_seed(training_args.seed)
    output_dir = Path(expand_output_dir(training_args, model_args, data_args, *extra_args))
    prepare_output_dir(training_args)
    # Publishing is done once, at the end, from the finished output directory (with our model card), instead of
    # the Trainer's push at every save. The token leaves TrainingArguments before the Trainer pickles them
    # into training_args.bin or logs them.
    publish, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args.push_to_hub, training_args.hub_token = False, None

    ##############################
    # Checkpoint, data, strategy #
    ##############################
    trainer, data, splits, load_report = prepare_trainer(
        model_args, data_args, training_args, strategy_args, dataset=dataset, train=train
    )
    if not train and not load_report.kept_head:
        from hf_finetune.errors import UserError

        raise UserError(
            f"The checkpoint `{model_args.model_name_or_path}` cannot be used as it is: its labels "
            f"{load_report.checkpoint_labels[:10]} are not the data's {data.labels[:10]}. Train it instead."
        )
    record = start_output(training_args)
    # overwrite_output_dir starts from scratch: never resume from a checkpoint left in the folder.
    resume = training_args.resume_from_checkpoint or (
        None if training_args.overwrite_output_dir else last_complete_checkpoint(output_dir)
    )
    trainer.add_callback(ResumeReport(resume))  # logs where it resumes from and what it restored

    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        output.write_resolved_config(output_dir, model_args, data_args, *extra_args, training_args)
        output.write_bad_images(output_dir, data.bad_images)
        atomic.write_json(output_dir / output.DATA_SPLITS, {"labels": data.labels, "splits": data.report})
        atomic.write_json(
            output_dir / output.RUN_SUMMARY,
            {
                "checkpoint_head": "kept (labels identical)" if load_report.kept_head else "re-initialised",
                "reinitialised_tensors": load_report.reinitialised,
                "checkpoint_labels": load_report.checkpoint_labels[:50],
                "bad_images_skipped": len(data.bad_images),
                "strategy": strategy_args.strategy,
            },
        )
        atomic.write_json(output_dir / STRATEGY_SUMMARY, trainer.strategy_summary())

    ############
    # Training #
    ############
    if train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        metrics = {**train_result.metrics, "train_samples": len(splits["train"])}
    else:
        metrics = {}
    if trainer.is_world_process_zero():
        # Again after training: the optimizer's real groups and, for gradual, the schedule as it happened.
        atomic.write_json(output_dir / STRATEGY_SUMMARY, trainer.strategy_summary())
    if strategy_args.strategy == "lora":
        from hf_finetune.strategies.lora_outputs import save_lora_outputs

        save_lora_outputs(trainer, output_dir, merge=strategy_args.lora_merge)
    else:
        trainer.save_model()
    trainer.save_state()

    ##############
    # Evaluation #
    ##############
    eval_metrics = trainer.evaluate(eval_dataset=splits["validation"], metric_key_prefix="eval")
    eval_metrics["eval_samples"] = len(splits["validation"])
    # Reports are drawn on the test split, or on validation when there is no test split.
    report_split = "test" if "test" in splits else "validation"
    predictions = trainer.predict(splits[report_split], metric_key_prefix=report_split)
    sections = ([("train", metrics)] if train else []) + [("eval", eval_metrics)]
    if report_split == "test":
        test_metrics = {**predictions.metrics, "test_samples": len(splits["test"])}
        sections.append(("test", test_metrics))
    results = {key: value for _, part in sections for key, value in part.items()}
    for name, part in sections:
        trainer.log_metrics(name, part)

    ##########################################
    # Output directory: metrics, reports,    #
    # model card; then publish               #
    ##########################################
    if trainer.is_world_process_zero():
        from hf_finetune.outputs.reports import report_section, write_reports

        report_files = write_reports(
            output_dir,
            logits=predictions.predictions,
            labels=predictions.label_ids,
            label_names=data.labels,
            images=undecoded_images(data.splits[report_split], data.image_column),
            log_history=trainer.state.log_history,
            split="test" if report_split == "test" else "validation",
            locate=data.image_name,
        )
        output.relativize_trainer_state(output_dir)
        write_card(
            output_dir, model_args, data_args, training_args, data.labels, results, extra_args,
            reports=report_section(report_files),
        )  # fmt: skip
        # Metrics last: all_results.json marks a finished run (see prepare_output_dir).
        for name, part in sections:
            trainer.save_metrics(name, part)
        if record is not None:
            record.finish()
        if publish:
            from hf_finetune.outputs.publish import publish as publish_dir

            repo_id = training_args.hub_model_id or output_dir.name
            publish_dir(output_dir, repo_id, private=training_args.hub_private_repo, token=hub_token)
    return results


def undecoded_images(dataset, image_column: str):
    """The image column as {"bytes", "path"} values, without decoding every picture up front."""
    from datasets import Image

    return dataset.cast_column(image_column, Image(decode=False))[image_column]


def write_card(
    output_dir, model_args, data_args, training_args, labels, results, extra_args=(), reports=None
) -> None:
    """The run's model card, from what the run and its strategy contribute (`reports`: a `CardSection`)."""
    strategy_args = next((a for a in extra_args if hasattr(a, "strategy")), None)
    strategy = strategy_args.strategy if strategy_args is not None else "full"
    settings = card.non_default_settings(strategy_args) if strategy_args is not None else {}
    sections = [reports]
    if strategy == "lora":
        from hf_finetune.strategies.lora_outputs import card_section

        lora = card_section(
            output_dir,
            model_args.model_name_or_path,
            labels,
            training_args.hub_model_id,
            strategy_args.lora_merge,
        )
        sections.insert(0, card.CardSection.from_markdown(lora))
    content = card.ModelCardContent.for_run(
        output_dir,
        training_args,
        data_args,
        base_model=model_args.model_name_or_path,
        labels=labels,
        results=results,
        strategy=strategy,
        strategy_settings=settings,
        sections=sections,
    )
    card.write_model_card(output_dir, content)
