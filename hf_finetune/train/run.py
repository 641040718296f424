"""One training run, as a list of stages each entered once, data flowing one way (about 590 lines because
the stages stay in one file, in order, so that a run reads top to bottom):

    config -> data -> model -> strategy -> Trainer -> evaluation -> outputs

`run` reads as that list; each stage is one small function below that takes what the earlier stages produced
(`RunSettings`, `Checkpoint`, `RunData`, the model and its plan, the Trainer, `Evaluation`) and hands its own
result on. The output folder is checked in the config stage (before any work) and opened once the Trainer
exists (the run is then known to start, and the Trainer writes its checkpoints into it); the outputs stage
finishes it. The Trainer itself is assembled in `hf_finetune.train.trainer`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_finetune.config import (
    DataArguments,
    FinetuneTrainingArguments,
    ModelArguments,
)
from hf_finetune.config_resolved import expand_output_dir
from hf_finetune.data.images import undecoded_images
from hf_finetune.outputs import atomic, card
from hf_finetune.outputs import files as output
from hf_finetune.outputs.run_folder import prepare_output_dir, start_output
from hf_finetune.time_budget import DATA_PHASE, TimeBudget, active, timed
from hf_finetune.train.trainer import assemble_trainer

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# The stages of a run, in order. Each takes what the stages before it produced and hands its own result on.
# --------------------------------------------------------------------------------------------------------
@dataclass
class RunSettings:
    """The config stage's result: what the later stages need besides the argument dataclasses."""

    output_dir: Path
    strategy_args: Any
    # Every argument dataclass besides model / data / training, the strategy's first: the resolved config and
    # the {setting} placeholders of output_dir are written from them.
    extra_args: tuple
    publish: bool
    hub_token: str | None


@dataclass
class Checkpoint:
    """The checkpoint's own settings, read before any data: a wrong id fails in seconds."""

    config: Any
    image_processor: Any


@dataclass
class RunData:
    """The data stage's result: what the data is (labels, columns, skipped pictures, split report) and the
    splits as the Trainer reads them (lazy transforms attached)."""

    prepared: Any  # hf_finetune.data.sources.PreparedData
    splits: dict


@dataclass
class StrategyStage:
    """The strategy stage's result: the model that trains, its freezing plan, and for LP-FT the probe it
    starts from (`notes`, for run_summary.json) and, with `wise_ft`, the starting weights."""

    model: Any
    plan: Any
    notes: dict
    start_state: dict | None = None


@dataclass
class Evaluation:
    """The evaluation stage's result: metrics by section (train, eval, test) and the report split's predictions."""

    sections: list
    results: dict[str, Any]  # every section's metrics in one dict: what `run` returns
    predictions: Any
    report_split: str
    calibration: Any = None  # train.calibration.Calibration: T fitted on validation, ECE before / after
    thresholds: list | None = None  # multi-label: each label's threshold, chosen on validation


def configure(model_args, data_args, training_args, strategy_args, extra_args=()) -> RunSettings:
    """Config: the seed, the output folder (its placeholders filled, checked writable, never a finished run
    replaced silently) and the Hub token held back."""
    from transformers import set_seed

    from hf_finetune.strategies.arguments import StrategyArguments
    from hf_finetune.train.averaging import check_soup_strategy

    check_soup_strategy(training_args.soup_last_k, strategy_args.strategy)
    extra_args = (strategy_args, *(a for a in extra_args if not isinstance(a, StrategyArguments)))
    set_seed(training_args.seed)
    output_dir = Path(expand_output_dir(training_args, model_args, data_args, *extra_args))
    prepare_output_dir(training_args)
    # Publishing is done once, at the end, from the finished output directory (with our model card), instead of
    # the Trainer's push at every save. The token leaves TrainingArguments before the Trainer pickles them
    # into training_args.bin or logs them.
    publish, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args.push_to_hub, training_args.hub_token = False, None
    return RunSettings(output_dir, strategy_args, extra_args, publish, hub_token)


def open_checkpoint(model_args) -> Checkpoint:
    """Config: the checkpoint's config and image processor, before any data is read."""
    from hf_finetune.models.loading import load_config, load_image_processor

    return Checkpoint(load_config(model_args), load_image_processor(model_args))


def prepare_run_data(
    data_args, training_args, image_processor, cache_dir=None, dataset=None, train=True, inspection=None
) -> RunData:
    """Data: load, check and split, then attach the checkpoint's transforms.

    `train=False` (evaluation only) makes no downscaled copies: each picture is decoded once either way.
    `inspection` (`inspect: true`): its `exclude` list leaves the training split before the transforms.
    """
    from hf_finetune.data.prepare import prepare_data
    from hf_finetune.data.transforms import attach_transforms, decode_sizes
    from hf_finetune.inspection.run import drop_excluded

    # Worked out once: the downscaled copies and the transforms that read them use the same sizes.
    sizes = decode_sizes(image_processor, data_args)
    if data_args.streaming:  # the training split as a stream, validation and test read once
        from hf_finetune.data.stream_source import prepare_streamed_data

        with training_args.main_process_first(desc="dataset preparation"):
            return RunData(
                *prepare_streamed_data(data_args, training_args, image_processor, cache_dir, sizes)
            )
    copy_splits = splits_worth_copies(training_args) if data_args.downscale_images and train else ()
    # The main process scans and caches the data first; the others then read its cache.
    with training_args.main_process_first(desc="dataset preparation"):
        prepared = prepare_data(
            data_args,
            training_args.seed,
            cache_dir=cache_dir,
            dataset=dataset,
            downscale=sizes if copy_splits else None,
            copy_splits=copy_splits,
        )
    prepared = drop_excluded(prepared, inspection)  # exclude: [leakage, label_issues], listed and counted
    splits = attach_transforms(
        prepared.splits,
        image_processor,
        data_args,
        prepared.image_column,
        prepared.label_column,
        training_args.seed,
        sizes=sizes,
    )
    return RunData(prepared, splits)


def splits_worth_copies(training_args) -> tuple[str, ...]:
    """The splits whose large pictures get downscaled copies in this run.

    Evaluation splits always: evaluation decodes every picture in full (as `pipeline()` does), and the copy is
    made from that same full decode, in the image check's threads, so the copy costs an encode of a small
    picture and evaluation then decodes the small copy instead. Training only when the run trains more than
    one epoch (or by `max_steps`): training decodes at reduced size (JPEG draft) anyway, so with one epoch a
    copy would only add its encode and the check's fuller decode (Lite0 at 96 px on 640x480 JPEGs: 1.3 s
    for 320 copies against 0.2 s for the check alone); a longer run over the same data makes them.
    """
    if training_args.max_steps > 0 or training_args.num_train_epochs > 1:
        return ("train", "validation", "test")
    logger.info("Downscaled copies: none for train (one epoch reads each training picture once)")
    return ("validation", "test")


def load_run_model(
    model_args, labels: list[str], checkpoint: Checkpoint, as_is: bool = False, multi_label: bool = False
):
    """Model: the checkpoint for the data's labels; (model, load report). `as_is` (evaluation only) requires
    the checkpoint's own labels to be the data's."""
    from hf_finetune.errors import UserError
    from hf_finetune.models.loading import load_model

    model, load_report = load_model(model_args, labels, checkpoint.config, multi_label=multi_label)
    if as_is and not load_report.kept_head:
        raise UserError(
            f"The checkpoint `{model_args.model_name_or_path}` cannot be used as it is: its labels "
            f"{load_report.checkpoint_labels[:10]} are not the data's {labels[:10]}. Train it instead."
        )
    return model, load_report


def apply_strategy(
    model, strategy_args, training_args, data: RunData, model_args, data_args, load_report=None
) -> StrategyStage:
    """Strategy: what trains, and (LP-FT) the head it starts from. `load_report` (the model load's) tells
    whether the head is new on a pretrained body, which an unset head_lr_multiplier reads."""
    from hf_finetune.data.transforms import collate
    from hf_finetune.strategies.plan import prepare_strategy, wrap_for_strategy

    notes, start_state = {}, None
    if strategy_args.strategy == "lp_ft":
        from hf_finetune.strategies.lp_ft import initialise_head_from_probe

        # The run's own prepared data: the probe fits on the training rows the fine-tuning uses (after exclude).
        notes["lp_ft_probe"] = initialise_head_from_probe(
            model, data.prepared, model_args, data_args, training_args
        )
        if strategy_args.wise_ft:
            from hf_finetune.train.averaging import snapshot

            start_state = snapshot(model)
    model = wrap_for_strategy(model, strategy_args)  # lora: the checkpoint in peft adapters
    # Freeze before the Trainer exists: it reads ddp_find_unused_parameters when it builds the accelerator.
    # Two real training images let the plan find parameters the forward pass never uses.
    # A streamed training split has no rows to index: validation's pictures have the same shape.
    train_split = data.splits["validation" if data_args.streaming else "train"]
    example = collate([train_split[i] for i in range(min(2, len(train_split)))])
    new_head = load_report is not None and not load_report.kept_head and not model_args.from_scratch
    plan = prepare_strategy(model, strategy_args, training_args, example_inputs=example, new_head=new_head)
    return StrategyStage(model, plan, notes, start_state)


def prepare_trainer(model_args, data_args, training_args, strategy_args, dataset=None, train: bool = True):
    """Checkpoint, data, model, strategy and the Trainer built from them, exactly as `run` does (nothing trains).

    Returns (trainer, prepared data, transformed splits, the checkpoint's load report).
    """
    checkpoint = open_checkpoint(model_args)
    data = prepare_run_data(
        data_args, training_args, checkpoint.image_processor, model_args.cache_dir, dataset, train
    )
    model, load_report = load_run_model(
        model_args, data.prepared.labels, checkpoint, multi_label=data.prepared.multi_label
    )
    stage = apply_strategy(model, strategy_args, training_args, data, model_args, data_args, load_report)
    trainer = assemble_trainer(stage.model, stage.plan, training_args, data, checkpoint.image_processor)
    return trainer, data.prepared, data.splits, load_report


def open_output_dir(
    trainer, settings: RunSettings, model_args, data_args, training_args, data, load_report, notes=None
):
    """Trainer (the run now starts, and the Trainer writes its checkpoints into the output folder): replace the
    previous run's files (with `overwrite_output_dir`), then write this run's settings, splits and summary."""
    from hf_finetune.strategies.registry import STRATEGY_SUMMARY

    record = start_output(training_args)
    output_dir = settings.output_dir
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        output.write_resolved_config(output_dir, model_args, data_args, *settings.extra_args, training_args)
        output.write_bad_images(output_dir, data.bad_images)
        atomic.write_json(output_dir / output.DATA_SPLITS, {"labels": data.labels, "splits": data.report})
        atomic.write_json(
            output_dir / output.RUN_SUMMARY,
            {
                "checkpoint_head": "kept (labels identical)" if load_report.kept_head else "re-initialised",
                "reinitialised_tensors": load_report.reinitialised,
                "checkpoint_labels": load_report.checkpoint_labels[:50],
                "bad_images_skipped": len(data.bad_images),
                "strategy": settings.strategy_args.strategy,
                **(notes or {}),
            },
        )
        atomic.write_json(output_dir / STRATEGY_SUMMARY, trainer.strategy_summary())
    return record


def train_and_save(
    trainer, settings: RunSettings, training_args, splits, train: bool = True, start_state=None
) -> dict:
    """Trainer: train (resuming from the newest complete checkpoint), then choose between the trained weights
    and their averages (EMA; the soup of the last checkpoints; WiSE-FT from `start_state`) on validation, and save the weights and the state.
    Returns the training metrics (none when `train` is false)."""
    from hf_finetune.strategies.registry import STRATEGY_SUMMARY
    from hf_finetune.time_budget import TRAINING_STEPS, budget_callback, split_training
    from hf_finetune.train.averaging import choose_soup, choose_wise_ft
    from hf_finetune.train.checkpoints import last_complete_checkpoint
    from hf_finetune.train.ema import EmaCallback, choose_ema_or_raw
    from hf_finetune.train.resume import ResumeReport

    output_dir, strategy_args = settings.output_dir, settings.strategy_args
    # overwrite_output_dir starts from scratch: never resume from a checkpoint left in the folder.
    resume = training_args.resume_from_checkpoint or (
        None if training_args.overwrite_output_dir else last_complete_checkpoint(output_dir)
    )
    trainer.add_callback(ResumeReport(resume))  # logs where it resumes from and what it restored
    ema = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EmaCallback)), None)
    metrics = {}
    # Which validation metric chooses between weights: mAP for multi-label data, else accuracy.
    chooser = "mAP" if getattr(trainer.compute_metrics, "multi_label", False) else "accuracy"
    if train:
        if ema is not None:
            ema.resume_from = resume  # the average continues from the checkpoint's
        timing = budget_callback()
        trainer.add_callback(timing)
        with timed(TRAINING_STEPS):
            train_result = trainer.train(resume_from_checkpoint=resume)
        split_training(
            timing
        )  # per-epoch evaluation, checkpoint saves, best-model reload: phases of their own
        if hasattr(splits["train"], "__len__"):
            metrics = {**train_result.metrics, "train_samples": len(splits["train"])}
        else:  # streamed: the pictures seen, and the unreadable ones skipped on the way
            from hf_finetune.train.streamed import streamed_train_metrics

            metrics = {**train_result.metrics, **streamed_train_metrics(trainer, output_dir)}
        with timed("EMA / soup / WiSE-FT choice on validation"):
            if ema is not None:
                metrics.update(choose_ema_or_raw(trainer, ema, splits["validation"], f"eval_{chooser}"))
            if training_args.soup_last_k:
                metrics.update(
                    choose_soup(
                        trainer,
                        output_dir,
                        training_args.soup_last_k,
                        splits["validation"],
                        f"eval_{chooser}",
                    )
                )
            if start_state is not None:
                metrics.update(choose_wise_ft(trainer, start_state, splits["validation"], f"eval_{chooser}"))
    with timed("saving weights and state"):
        if trainer.is_world_process_zero():
            # Again after training: the optimizer's real groups and, for gradual, the schedule as it happened.
            atomic.write_json(output_dir / STRATEGY_SUMMARY, trainer.strategy_summary())
        if strategy_args.strategy == "lora":
            from hf_finetune.strategies.lora_outputs import save_lora_outputs

            save_lora_outputs(trainer, output_dir, merge=strategy_args.lora_merge)
        else:
            trainer.save_model()
        trainer.save_state()
    return metrics


def evaluate_splits(
    trainer, splits, train_metrics: dict, train: bool = True, weights_replaced=False, multi_label=False
) -> Evaluation:
    """Evaluation: validation metrics and logits (one pass, or none when a per-epoch evaluation already saw the
    final weights; `weights_replaced`: the EMA or WiSE-FT choice set them), and the test split's (or, without
    one, validation's) predictions.

    Multi-label: per-label thresholds chosen on the validation predictions, and every split's decision metrics
    at them too (`_at_thresholds`); no temperature scaling (it is fitted for one softmax)."""
    if multi_label:
        from hf_finetune.train.multilabel import evaluate_multi_label

        sections, predictions, report_split, thresholds = evaluate_multi_label(
            trainer, splits, train_metrics, train
        )
        results = {key: value for _, part in sections for key, value in part.items()}
        return Evaluation(sections, results, predictions, report_split, None, thresholds)
    from hf_finetune.train.calibration import calibrate_trainer  # temperature fitted on validation
    from hf_finetune.train.validation_pass import validation_metrics_and_outputs

    eval_metrics, val_logits, val_labels = validation_metrics_and_outputs(
        trainer, splits["validation"], weights_replaced or not train
    )
    eval_metrics["eval_samples"] = len(splits["validation"])
    # Reports are drawn on the test split, or on validation when there is no test split.
    report_split = "test" if "test" in splits else "validation"
    if report_split == "test":
        predictions = trainer.predict(splits["test"], metric_key_prefix="test")
    else:
        from transformers.trainer_utils import PredictionOutput

        predictions = PredictionOutput(val_logits, val_labels, eval_metrics)
    sections = ([("train", train_metrics)] if train else []) + [("eval", eval_metrics)]
    if report_split == "test":
        sections.append(("test", {**predictions.metrics, "test_samples": len(splits["test"])}))
    if trainer.args.tta_flip:  # reported beside the plain figures; the saved model stays plain
        from hf_finetune.train.tta import flip_tta_metrics

        prefix = "test" if report_split == "test" else "eval"
        dict(sections)[prefix].update(flip_tta_metrics(trainer, splits[report_split], predictions, prefix))
    calibration = calibrate_trainer(
        trainer, splits, predictions if report_split == "test" else None, validation=(val_logits, val_labels)
    )
    if calibration is not None:
        calibration.add_metrics(dict(sections))
    results = {key: value for _, part in sections for key, value in part.items()}
    for name, part in sections:
        trainer.log_metrics(name, part)
    return Evaluation(sections, results, predictions, report_split, calibration)


def finish_outputs(
    trainer, settings: RunSettings, record, evaluation: Evaluation, data, model_args, data_args, training_args,
    budget=None,
) -> None:  # fmt: skip
    """Outputs: reports (multi-label: per-label report and AP plot, thresholds in config.json), the model card,
    the time budget (`budget`, into run_summary.json and the log), the metrics (last: they mark a finished
    run), then publishing."""
    if not trainer.is_world_process_zero():
        return
    from hf_finetune.outputs.reports import report_section, write_reports

    output_dir, predictions = settings.output_dir, evaluation.predictions
    with timed("reports (plots, tables, error grid)"):
        if evaluation.thresholds is not None:
            from hf_finetune.outputs import multilabel

            report_files = multilabel.write_multi_label_outputs(
                output_dir, predictions, data.labels, evaluation.thresholds, evaluation.report_split,
                trainer.state.log_history, plots=training_args.report_plots,
            )  # fmt: skip
        else:
            report_files = write_reports(
                output_dir,
                logits=predictions.predictions,
                labels=predictions.label_ids,
                label_names=data.labels,
                images=undecoded_images(data.splits[evaluation.report_split], data.image_column),
                log_history=trainer.state.log_history,
                split=evaluation.report_split,
                locate=data.image_name,
                plots=training_args.report_plots,
            )
    output.relativize_trainer_state(output_dir)
    from hf_finetune.outputs.reliability import card_section, write_calibration

    with timed("calibration files"):
        # calibration.json, the diagram, T in config.json
        write_calibration(output_dir, evaluation.calibration, plot=training_args.report_plots)
    with timed("model card"):
        write_card(
            output_dir, model_args, data_args, training_args, data.labels, evaluation.results,
            settings.extra_args, reports=report_section(report_files),
        )  # fmt: skip
        if evaluation.calibration is not None:  # ECE before / after, T and the diagram, as a card section
            card.add_card_section(output_dir, card_section(evaluation.calibration))
        if evaluation.thresholds is not None:  # what the thresholds are and how they were chosen
            card.add_card_section(
                output_dir, multilabel.card_section(data.labels, evaluation.thresholds, evaluation.results)
            )
        write_weights_choice(output_dir, evaluation.results)
    if budget is not None:
        output.add_to_run_summary(output_dir, {"time_budget": budget.as_dict()})
        budget.log()
    # Metrics last: all_results.json marks a finished run (see prepare_output_dir).
    for name, part in evaluation.sections:
        trainer.save_metrics(name, part)
    if record is not None:
        record.finish()
    if settings.publish:
        from hf_finetune.outputs.publish import publish as publish_dir

        repo_id = training_args.hub_model_id or output_dir.name
        publish_dir(output_dir, repo_id, private=training_args.hub_private_repo, token=settings.hub_token)


def write_weights_choice(output_dir: Path, results: dict) -> None:
    """Which weights became the model (EMA, soup, WiSE-FT), into run_summary.json and the card's Weights section."""
    from hf_finetune.train.averaging import card_text, weights_chosen

    choice = weights_chosen(results)
    if choice is None:
        return
    summary_path = output_dir / output.RUN_SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    atomic.write_json(summary_path, {**summary, "weights_chosen": choice})
    card.add_card_section(output_dir, card.CardSection("Weights", card_text(choice)))


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FinetuneTrainingArguments,
    dataset=None,
    extra_args: tuple = (),
    strategy_args=None,
    train: bool = True,
    callbacks=(),
) -> dict[str, Any]:
    """Train, evaluate on validation and test, and write the output directory. Returns all metrics.

    One pass through the stages, each entered once: config -> data -> model -> strategy -> Trainer ->
    evaluation -> outputs.

    `strategy_args.strategy == "probe"` runs the frozen-feature path instead (`probe.run_probe`), with the
    probe settings of `strategy_args` when it is a `ProbeArguments` (as `parse_train_args` gives), else the
    probe's defaults.

    `train=False` evaluates and writes the checkpoint as it is (its labels must already be the data's): the
    "use the checkpoint as it is" way to transfer.

    `strategy_args.strategy == "auto"` measures first and then runs its choice (`strategies.auto`). `callbacks`:
    more Trainer callbacks (auto's budget guard).
    """
    from hf_finetune.strategies.arguments import StrategyArguments
    from hf_finetune.strategies.registry import AUTO_STRATEGY, FEATURE_STRATEGY

    strategy_args = strategy_args or StrategyArguments()
    if data_args.streaming:
        from hf_finetune.train.streamed import check_streaming_settings

        check_streaming_settings(data_args, training_args, strategy_args, extra_args)
    if strategy_args.strategy == AUTO_STRATEGY:
        from hf_finetune.strategies.auto import RunStages, run_auto

        # This module's stages are handed over, so that strategies.auto does not import it back.
        stages = RunStages(open_checkpoint, prepare_run_data, load_run_model, apply_strategy, run)
        return run_auto(stages, model_args, data_args, training_args, strategy_args, dataset, extra_args)
    if strategy_args.strategy == FEATURE_STRATEGY:
        # The one strategy switch: `probe` is the frozen-feature path (features once, a classic classifier).
        from hf_finetune.inspection.run import refuse_inspection_for_probe
        from hf_finetune.probe.arguments import ProbeArguments, ProbeRunArguments
        from hf_finetune.probe.run import run_probe

        refuse_inspection_for_probe(extra_args)
        probe_args = strategy_args if isinstance(strategy_args, ProbeArguments) else ProbeRunArguments()
        return run_probe(model_args, data_args, probe_args, training_args, dataset=dataset)

    from hf_finetune.inspection.run import inspect_before_training, write_training_report

    with active(TimeBudget()) as budget:  # seconds per phase: the log and run_summary.json's time_budget
        with timed("settings and output folder check"):
            settings = configure(model_args, data_args, training_args, strategy_args, extra_args)
        # inspect: true (hf_finetune.inspection): the data report, and what `exclude` drops from training
        with timed("data inspection (inspect: true)"):
            inspection = inspect_before_training(
                model_args, data_args, training_args, settings.extra_args, dataset
            )
        with timed("checkpoint config and processor"):
            checkpoint = open_checkpoint(model_args)
        with timed(DATA_PHASE):
            data = prepare_run_data(
                data_args, training_args, checkpoint.image_processor, model_args.cache_dir, dataset, train,
                inspection,
            )  # fmt: skip
        with timed("model load"):
            model, load_report = load_run_model(
                model_args,
                data.prepared.labels,
                checkpoint,
                as_is=not train,
                multi_label=data.prepared.multi_label,
            )
        with timed("strategy"):
            stage = apply_strategy(
                model, strategy_args, training_args, data, model_args, data_args, load_report
            )
        with timed("trainer assembly"):
            trainer = assemble_trainer(
                stage.model, stage.plan, training_args, data, checkpoint.image_processor, callbacks=callbacks
            )
        with timed("output folder"):
            record = open_output_dir(
                trainer,
                settings,
                model_args,
                data_args,
                training_args,
                data.prepared,
                load_report,
                stage.notes,
            )
            if trainer.is_world_process_zero():
                write_training_report(settings.output_dir, inspection)  # inspect: true: data_report.md / ...
        train_metrics = train_and_save(
            trainer, settings, training_args, data.splits, train, stage.start_state
        )
        with timed("final evaluation (validation, test)"):
            replaced = (
                training_args.ema or training_args.soup_last_k or stage.start_state is not None
            )  # the final weights chosen after training
            evaluation = evaluate_splits(
                trainer, data.splits, train_metrics, train, replaced, data.prepared.multi_label
            )
        finish_outputs(
            trainer, settings, record, evaluation, data.prepared, model_args, data_args, training_args, budget
        )
    return evaluation.results


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
