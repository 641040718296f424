"""`strategy: auto`: the way to transfer expected to score best on validation that fits `time_budget_minutes`.

A run with `strategy: auto` first gathers evidence, then runs one ordinary strategy with it:

1. the linear probe is fitted on cached frozen features (seconds; it is also what `lp_ft` starts from);
2. a few optimiser steps of each distinct trainable set are timed, after one warm-up step, with the run's batch
   size, input size and settings (on a copy of the model, in a throw-away Trainer), and a small validation pass;
3. each candidate's run time is estimated: seconds per step x its optimiser steps + its evaluation passes
   (per-epoch evaluations, the final validation, test and calibration passes, EMA / WiSE-FT choices) + fixed costs
   (preparing the data and the model again, LP-FT's probe fit, writing the outputs);
4. candidates are taken in :data:`PRIOR_ORDER`; the first whose whole plan fits the budget left runs. When the
   best one does not fit, its epochs are shrunk to what fits (at least :data:`MIN_SHRUNK_EPOCHS`) rather than
   switching to a cheaper way; when nothing does, the probe already fitted is the model.

The chosen strategy then runs through `hf_finetune.train.run.run` exactly as a run naming it would (the run
re-seeds before it loads the model, and the timing touched only copies), so `auto` choosing X gives the model
`strategy: X` gives, with the same epochs. A guard (:class:`BudgetGuard`) stops training early when the machine
turns out slower than measured, and says so. The decision, every measured figure and the estimate per
candidate go into run_summary.json (`auto`) and a model-card section. Under several processes every process
measures, the figures are all-reduced (the slowest process's), and every process makes the same choice.

The expected-accuracy order is a prior, not a measurement of this data set; the card says so.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from hf_finetune.strategies.auto_choice import (
    OUTPUT_SECONDS,
    TIMED_AS,
    TIMED_STEPS,
    WARMUP_STEPS,
    Evidence,
    card_section,
    choose,
)

logger = logging.getLogger(__name__)

EVAL_TIMING_IMAGES = 64  # validation pictures of the timed evaluation pass


# --------------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------------
class StepClock(TrainerCallback):
    """perf_counter at the end of every optimiser step (data loading included between two of them)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class BudgetGuard(TrainerCallback):
    """Stops training when the rest of the run (evaluation and outputs, `reserve_seconds`) would no longer fit
    before `deadline` (a perf_counter value). Under several processes the processes agree at every step."""

    def __init__(self, deadline: float, reserve_seconds: float):
        self.deadline, self.reserve_seconds = deadline, reserve_seconds
        self.stopped_at_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        late = float(time.perf_counter() + self.reserve_seconds > self.deadline)
        if all_reduce_max([late], args)[0] > 0 and state.global_step < state.max_steps:
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
            logger.warning(
                "strategy auto: training stops at step %d of %d to stay within the time budget.",
                state.global_step,
                state.max_steps,
            )


def all_reduce_max(values: list[float], training_args) -> list[float]:
    """`values` as the maximum over the processes (as they are in one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    device = training_args.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def timing_arguments(training_args, output_dir: str, steps: int):
    """A copy of the run's arguments for a throw-away Trainer: `steps` optimiser steps, nothing evaluated,
    saved, logged or reported (the batch size, precision and input pipeline stay the run's)."""
    timing = copy.copy(training_args)
    timing.output_dir = output_dir
    timing.max_steps = steps
    timing.eval_strategy = timing.save_strategy = timing.logging_strategy = "no"
    timing.load_best_model_at_end = False
    timing.report_to = []
    timing.early_stopping_patience = None
    timing.disable_tqdm = True
    timing.resume_from_checkpoint = None
    return timing


@dataclass
class RunStages:
    """The stages of `hf_finetune.train.run` that `auto` measures with and the run it hands its choice to
    (given by that module, which calls `run_auto`, so that this one does not import it back)."""

    open_checkpoint: Any
    prepare_run_data: Any
    load_run_model: Any
    apply_strategy: Any
    run: Any


def time_candidate(stages, base_model, strategy, strategy_args, training_args, data, checkpoint, model_args,
                   data_args):  # fmt: skip
    """(seconds per optimiser step, optimiser steps per epoch, the Trainer) of `strategy` on a copy of the model."""
    from hf_finetune.train.trainer import assemble_trainer

    with tempfile.TemporaryDirectory(prefix="hf_finetune_auto_") as scratch:
        args = timing_arguments(training_args, scratch, WARMUP_STEPS + TIMED_STEPS)
        model = copy.deepcopy(base_model)
        candidate = dataclasses.replace(
            strategy_args, strategy=strategy, time_budget_minutes=None, wise_ft=False
        )
        stage = stages.apply_strategy(model, candidate, args, data, model_args, data_args)
        trainer = assemble_trainer(stage.model, stage.plan, args, data, checkpoint.image_processor)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
        gaps = [
            b - a for a, b in zip(clock.ends[WARMUP_STEPS - 1 :], clock.ends[WARMUP_STEPS:], strict=False)
        ]
        per_epoch = max(1, len(trainer.get_train_dataloader()) // max(1, args.gradient_accumulation_steps))
        return statistics.median(gaps), per_epoch, trainer


def time_evaluation(trainer, validation) -> float:
    """Seconds per validation image of an evaluation pass (a small one, after training steps warmed up)."""
    subset = validation.select(range(min(len(validation), EVAL_TIMING_IMAGES)))
    start = time.perf_counter()
    trainer.evaluate(eval_dataset=subset, metric_key_prefix="auto_timing")
    return (time.perf_counter() - start) / max(1, len(subset))


SKIP_TIMING_FRACTION = 0.5  # of the budget, spent by the probe: the candidates are not timed


def gather_evidence(
    stages, model_args, data_args, training_args, strategy_args, started: float, dataset=None
):
    """Fit the probe, time the candidates' steps and an evaluation pass; all-reduced across processes."""
    from hf_finetune.errors import UserError
    from hf_finetune.probe.arguments import ProbeRunArguments
    from hf_finetune.probe.run import fit_probe

    evidence = Evidence(budget_seconds=60.0 * strategy_args.time_budget_minutes)
    with training_args.main_process_first(desc="auto: the probe"):
        probe = fit_probe(
            model_args, data_args, ProbeRunArguments(), training_args, dataset=dataset, several_processes=True,
            refuse_multi_label="strategy auto weighs the candidates by accuracy, one class per picture, and the "
            "data is multi-label (a set of labels per picture). Choose a strategy yourself (probe, lp_ft, head, "
            "full, ...) for multi-label data.",
        )  # fmt: skip
    evidence.probe_eval_accuracy = probe.results.get("eval_accuracy")
    evidence.probe_fit_seconds = probe.results["probe_fit_seconds"]
    evidence.probe_seconds = probe.results["probe_feature_seconds"] + evidence.probe_fit_seconds
    # When the probe alone took half the budget, preparing the data again and timing steps would only overrun
    # it: no gradient way can fit what is left, so the probe is the model without more measuring.
    spent = all_reduce_max([time.perf_counter() - started], training_args)[0]
    if spent >= SKIP_TIMING_FRACTION * evidence.budget_seconds:
        why = f"not timed: the probe alone took {spent:.0f} s of the {evidence.budget_seconds:.0f} s budget"
        evidence.unavailable = dict.fromkeys(TIMED_AS.values(), why)
        evidence.elapsed_seconds = spent
        return evidence

    prepare_start = time.perf_counter()
    checkpoint = stages.open_checkpoint(model_args)
    data = stages.prepare_run_data(
        data_args, training_args, checkpoint.image_processor, model_args.cache_dir, dataset
    )
    base_model, _ = stages.load_run_model(model_args, data.prepared.labels, checkpoint)
    evidence.prepare_seconds = time.perf_counter() - prepare_start
    evidence.eval_images = len(data.splits["validation"])
    evidence.test_images = len(data.splits.get("test", []))

    trainer = None
    for timed in dict.fromkeys(TIMED_AS.values()):  # full, last_n: each distinct trainable set once
        try:
            seconds, per_epoch, trainer_of = time_candidate(
                stages,
                base_model,
                timed,
                strategy_args,
                training_args,
                data,
                checkpoint,
                model_args,
                data_args,
            )
        except UserError as err:  # e.g. last_n on a model without a block map
            evidence.unavailable[timed] = str(err)
            continue
        evidence.seconds_per_step[timed], evidence.steps_per_epoch = seconds, per_epoch
        trainer = trainer or trainer_of
    if trainer is not None:
        evidence.eval_seconds_per_image = time_evaluation(trainer, data.splits["validation"])
    evidence.elapsed_seconds = time.perf_counter() - started
    # Every process decides from the same figures: the slowest process's.
    names = sorted(evidence.seconds_per_step)
    figures = [evidence.seconds_per_step[n] for n in names] + [
        evidence.elapsed_seconds, evidence.prepare_seconds, evidence.probe_fit_seconds,
        evidence.eval_seconds_per_image,
    ]  # fmt: skip
    reduced = all_reduce_max(figures, training_args)
    evidence.seconds_per_step = dict(zip(names, reduced[: len(names)], strict=True))
    (evidence.elapsed_seconds, evidence.prepare_seconds, evidence.probe_fit_seconds,
     evidence.eval_seconds_per_image) = reduced[len(names) :]  # fmt: skip
    return evidence


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------
def run_auto(
    stages, model_args, data_args, training_args, strategy_args, dataset=None, extra_args=()
) -> dict:
    """Measure, choose, run the chosen strategy, and record the decision in run_summary.json and the card."""
    from hf_finetune.config_resolved import expand_output_dir
    from hf_finetune.outputs.run_folder import prepare_output_dir

    started = time.perf_counter()
    expand_output_dir(training_args, model_args, data_args, strategy_args, *extra_args)
    prepare_output_dir(training_args)  # a folder that cannot take the run fails before any measuring
    # Published once the decision is in the card, not by the chosen run before it.
    publish, hub_token = training_args.push_to_hub, training_args.hub_token
    training_args.push_to_hub, training_args.hub_token = False, None

    evidence = gather_evidence(stages, model_args, data_args, training_args, strategy_args, started, dataset)
    decision = choose(evidence, training_args, strategy_args)
    logger.info("strategy auto chose `%s`: %s", decision.strategy, decision.why)
    chosen_args = dataclasses.replace(
        strategy_args,
        strategy=decision.strategy,
        time_budget_minutes=None,
        wise_ft=strategy_args.wise_ft and decision.strategy == "lp_ft",  # WiSE-FT needs the LP-FT start
    )
    guard = None
    if decision.strategy == "probe":
        from hf_finetune.probe.arguments import ProbeRunArguments
        from hf_finetune.probe.run import run_probe

        results = run_probe(
            model_args, data_args, ProbeRunArguments(), training_args, dataset=dataset,
            several_processes=training_args.world_size > 1,
        )  # fmt: skip
    else:
        training_args.num_train_epochs = decision.epochs
        chosen = next(e for e in reversed(decision.estimates) if e.strategy == decision.strategy)
        reserve = chosen.eval_seconds + OUTPUT_SECONDS
        guard = BudgetGuard(started + evidence.budget_seconds, reserve)
        results = stages.run(
            model_args, data_args, training_args, dataset=dataset, extra_args=extra_args,
            strategy_args=chosen_args, callbacks=[guard],
        )  # fmt: skip
    record = decision.record()
    record["budget_guard_stopped_at_step"] = guard.stopped_at_step if guard is not None else None
    record["total_seconds"] = round(time.perf_counter() - started, 2)
    if training_args.world_size <= 1 or training_args.process_index == 0:
        write_decision(training_args.output_dir, record)
        if publish:
            from hf_finetune.outputs.publish import publish as publish_dir

            repo_id = training_args.hub_model_id or training_args.output_dir.rstrip("/").split("/")[-1]
            publish_dir(
                training_args.output_dir, repo_id, private=training_args.hub_private_repo, token=hub_token
            )
    return {**results, "auto_strategy": decision.strategy, "auto_total_seconds": record["total_seconds"]}


def write_decision(output_dir, record: dict) -> None:
    """The decision into run_summary.json (`auto`) and the model card's section."""
    from pathlib import Path

    from hf_finetune.outputs import atomic, card
    from hf_finetune.outputs.files import RUN_SUMMARY

    path = Path(output_dir) / RUN_SUMMARY
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    atomic.write_json(path, {**summary, "auto": record})
    card.add_card_section(output_dir, card_section(record))
