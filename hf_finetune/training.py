"""One training run: data + checkpoint -> Trainer -> metrics -> a complete, publishable output directory."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hf_finetune import output
from hf_finetune.args import DataArguments, FinetuneTrainingArguments, ModelArguments

logger = logging.getLogger(__name__)


def setup_logging(training_args) -> None:
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        force=True,
    )
    level = training_args.get_process_log_level()
    logging.getLogger("hf_finetune").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not os.path.isdir(output_dir):
        return None
    return get_last_checkpoint(output_dir)


def build_trainer(model, training_args, splits, image_processor, num_labels: int, callbacks=None, plan=None):
    from transformers import EarlyStoppingCallback, Trainer

    from hf_finetune.evaluation import ComputeMetrics
    from hf_finetune.strategies import strategy_trainer_class
    from hf_finetune.transforms import collate

    callbacks = list(callbacks or [])
    if getattr(training_args, "early_stopping_patience", None):
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    # With a freezing plan, the Trainer builds its optimizer groups and unfreezing schedule from it.
    trainer_cls, extra = (strategy_trainer_class(), {"plan": plan}) if plan is not None else (Trainer, {})
    return trainer_cls(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=collate,
        compute_metrics=ComputeMetrics(num_labels),
        processing_class=image_processor,
        callbacks=callbacks,
        **extra,
    )


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FinetuneTrainingArguments,
    dataset=None,
    extra_args: tuple = (),
    strategy_args=None,
) -> dict[str, Any]:
    """Train, evaluate on validation and test, and write the output directory. Returns all metrics."""
    from transformers import set_seed

    from hf_finetune.data import prepare_data
    from hf_finetune.modeling import load_config, load_image_processor, load_model
    from hf_finetune.strategies import STRATEGY_SUMMARY, StrategyArguments, prepare_strategy
    from hf_finetune.transforms import attach_transforms, collate

    strategy_args = strategy_args or StrategyArguments()
    extra_args = (strategy_args, *(a for a in extra_args if not isinstance(a, StrategyArguments)))

    setup_logging(training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    # Checkpoint first: a wrong id fails in seconds, before any data is read.
    config = load_config(model_args)
    image_processor = load_image_processor(model_args)
    # The main process scans and caches the data first; the others then read its cache.
    with training_args.main_process_first(desc="dataset preparation"):
        data = prepare_data(data_args, training_args.seed, cache_dir=model_args.cache_dir, dataset=dataset)
    model, load_report = load_model(model_args, data.labels, config)
    splits = attach_transforms(data.splits, image_processor, data_args, data.image_column, data.label_column)
    # Freeze before the Trainer exists: it reads ddp_find_unused_parameters when it builds the accelerator.
    # Two real training images let the plan find parameters the forward pass never uses.
    example = collate([splits["train"][i] for i in range(min(2, len(splits["train"])))])
    plan = prepare_strategy(model, strategy_args, training_args, example_inputs=example)

    # Publishing is done once, at the end, from the finished output directory (with our model card), instead of
    # the Trainer's push at every save.
    publish = training_args.push_to_hub
    training_args.push_to_hub = False

    trainer = build_trainer(model, training_args, splits, image_processor, len(data.labels), plan=plan)
    resume = training_args.resume_from_checkpoint or last_checkpoint(str(output_dir))
    if resume:
        logger.info("Resuming from %s", resume)

    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        output.write_resolved_config(output_dir, model_args, data_args, *extra_args, training_args)
        output.write_bad_images(output_dir, data.bad_images)
        output.write_json(output_dir / output.DATA_SPLITS, {"labels": data.labels, "splits": data.report})
        output.write_json(
            output_dir / output.RUN_SUMMARY,
            {
                "checkpoint_head": "kept (labels identical)" if load_report.kept_head else "re-initialised",
                "reinitialised_tensors": load_report.reinitialised,
                "checkpoint_labels": load_report.checkpoint_labels[:50],
                "bad_images_skipped": len(data.bad_images),
                "strategy": strategy_args.strategy,
            },
        )
        output.write_json(output_dir / STRATEGY_SUMMARY, trainer.strategy_summary())

    train_result = trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():
        # Again after training: the optimizer's real groups and, for gradual, the schedule as it happened.
        output.write_json(output_dir / STRATEGY_SUMMARY, trainer.strategy_summary())
    trainer.save_model()
    metrics = dict(train_result.metrics)
    metrics["train_samples"] = len(splits["train"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    eval_metrics = trainer.evaluate(eval_dataset=splits["validation"], metric_key_prefix="eval")
    eval_metrics["eval_samples"] = len(splits["validation"])
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    results = {**metrics, **eval_metrics}
    if "test" in splits:
        test_metrics = trainer.evaluate(eval_dataset=splits["test"], metric_key_prefix="test")
        test_metrics["test_samples"] = len(splits["test"])
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        results.update(test_metrics)

    if trainer.is_world_process_zero():
        write_card(output_dir, model_args, data_args, training_args, data.labels, results, extra_args)
        if publish:
            repo_id = training_args.hub_model_id or output_dir.name
            output.push_output_dir(
                output_dir, repo_id, training_args.hub_private_repo, training_args.hub_token
            )
    return results


def write_card(output_dir, model_args, data_args, training_args, labels, results, extra_args=()) -> None:
    strategy = next((a.strategy for a in extra_args if hasattr(a, "strategy")), "full")
    output.write_model_card(
        output_dir,
        model_name=training_args.hub_model_id or Path(output_dir).name,
        base_model=model_args.model_name_or_path,
        dataset_name=data_args.dataset_name,
        labels=labels,
        results=results,
        strategy=strategy,
        repo_id=training_args.hub_model_id,
    )
