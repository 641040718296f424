"""`strategy: auto`'s choice: the estimate of each candidate's run time from the measured figures, the prior order
of expected accuracy, and the decision with the evidence it rests on (run_summary.json's `auto`, the card
section). Pure arithmetic on the evidence, so every process of a launch makes the same choice from the same
(all-reduced) figures; the measuring and the run are `hf_finetune.strategies.auto`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Expected validation accuracy on small data, best first. From this project's measurements on Google's real
# ImageNet EfficientNet-Lite0 and the digits (benchmarks/README.md, shared MEASURED.md): LP-FT reached 0.950 at
# 128 px against 0.939 for the probe; full fine-tuning 0.926-0.941 against the probe's 0.948 at 64-96 px; the
# head alone 0.863 against the probe's 0.948 (4 epochs each). `llrd` and `last_n` were not measured here: they
# sit between `full` and the probe as the literature (BEiT, ULMFiT) places them. `head` trains a linear layer on
# the same frozen features the probe solves exactly, with its regularisation chosen on validation, so it ranks
# below the probe, which costs nothing more once fitted: `auto` never picks `head`.
PRIOR_ORDER = ("lp_ft", "full", "llrd", "last_n", "probe", "head")
PRIOR_NOTE = (
    "The order of expected accuracy is a prior from this project's measurements on other small data sets "
    "(EfficientNet-Lite0 on the digits: LP-FT 0.950 vs probe 0.939 at 128 px; full 0.926-0.941 and head 0.863 "
    "vs probe 0.948 at 64-96 px), not a measurement on this data; only the times are measured on this run."
)
# The best candidate runs with fewer epochs rather than giving way, down to one pass over the training data:
# below that the LP-FT start (the probe itself) has barely moved, and the probe is kept instead.
MIN_SHRUNK_EPOCHS = 1.0
WARMUP_STEPS = 1  # the first step pays for the dataloader's start and one-off allocations
TIMED_STEPS = 3
# Writing the weights, reports, plots and card after training: a few seconds on a CPU, held back generously.
OUTPUT_SECONDS = 15.0
# The estimate must fit this share of the budget left: the machine's speed varies between timing and training.
PLANNING_SHARE = 0.9
# What each candidate trains, for timing: `llrd` and `lp_ft` train the same parameters as `full` (only their
# learning rates / head start differ), so their step is full's step.
TIMED_AS = {"lp_ft": "full", "full": "full", "llrd": "full", "last_n": "last_n"}


@dataclass
class Estimate:
    """One candidate's estimated run time, from the measured figures."""

    strategy: str
    epochs: float
    optimizer_steps: int
    train_seconds: float
    eval_seconds: float
    fixed_seconds: float
    fits: bool = False
    epochs_that_fit: float = 0.0
    timed_as: str | None = None
    unavailable: str | None = None

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.eval_seconds + self.fixed_seconds


@dataclass
class Evidence:
    """What the choice rests on (all seconds; the same on every process once all-reduced)."""

    budget_seconds: float
    elapsed_seconds: float = 0.0  # since the run started, when the choice is made
    probe_eval_accuracy: float | None = None
    probe_seconds: float = 0.0
    probe_fit_seconds: float = 0.0
    prepare_seconds: float = 0.0  # data and model, as the chosen run prepares them again
    seconds_per_step: dict[str, float] = field(default_factory=dict)  # by timed trainable set
    steps_per_epoch: int = 0
    eval_seconds_per_image: float = 0.0
    eval_images: int = 0  # one validation pass
    test_images: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)


def _rounded(value, digits: int):
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return round(value, digits) if isinstance(value, float) else value


@dataclass
class Decision:
    """The chosen strategy and epochs (None for the probe), why, and what it rests on."""

    strategy: str
    epochs: float | None
    why: str
    estimates: list[Estimate]
    evidence: Evidence
    configured_epochs: float

    def record(self) -> dict[str, Any]:
        """run_summary.json's `auto` entry."""
        evidence = dataclasses.asdict(self.evidence)
        return {
            "requested": "auto",
            "time_budget_minutes": round(self.evidence.budget_seconds / 60, 3),
            "chosen": self.strategy,
            "epochs": self.epochs,
            "configured_epochs": self.configured_epochs,
            "why": self.why,
            "prior_order": list(PRIOR_ORDER),
            "prior_note": PRIOR_NOTE,
            "measured": {
                **{k: _rounded(v, 4) for k, v in evidence.items()},
                "warmup_steps": WARMUP_STEPS,
                "timed_steps": TIMED_STEPS,
            },
            "planning_share_of_budget": PLANNING_SHARE,
            "candidates": [
                {
                    **{k: _rounded(v, 2) for k, v in dataclasses.asdict(e).items()},
                    "estimate_seconds": round(e.seconds, 2),
                }
                for e in self.estimates
            ],
        }


def evaluation_passes(training_args, strategy: str, epochs: float, steps: int, strategy_args) -> float:
    """Validation-sized passes a run makes: its scheduled evaluations, the final validation and calibration
    passes, the EMA choice's two and WiSE-FT's five (the test pass is counted apart)."""
    from hf_finetune.config import schedule_name

    schedule = schedule_name(training_args.eval_strategy)
    scheduled = 0
    if schedule == "epoch":
        scheduled = math.ceil(epochs)
    elif schedule == "steps":
        every = training_args.eval_steps or 1
        every = every if every >= 1 else max(1, int(every * steps))
        scheduled = steps // every
    extra = 2 * bool(training_args.ema) + 5 * bool(strategy == "lp_ft" and strategy_args.wise_ft)
    return scheduled + 2 + extra


def optimizer_steps(training_args, epochs: float, steps_per_epoch: int) -> int:
    if training_args.max_steps and training_args.max_steps > 0:
        return int(training_args.max_steps)
    return max(1, math.ceil(epochs * steps_per_epoch))


def estimate(strategy, epochs, evidence: Evidence, training_args, strategy_args) -> Estimate:
    timed_as = TIMED_AS[strategy]
    steps = optimizer_steps(training_args, epochs, evidence.steps_per_epoch)
    passes = evaluation_passes(training_args, strategy, epochs, steps, strategy_args)
    images = passes * evidence.eval_images + evidence.test_images
    fixed = (
        evidence.prepare_seconds + OUTPUT_SECONDS + (evidence.probe_fit_seconds if strategy == "lp_ft" else 0)
    )
    return Estimate(
        strategy,
        epochs,
        steps,
        train_seconds=evidence.seconds_per_step[timed_as] * steps,
        eval_seconds=evidence.eval_seconds_per_image * images,
        fixed_seconds=fixed,
        timed_as=timed_as,
    )


def choose(evidence: Evidence, training_args, strategy_args) -> Decision:
    """The first candidate of `PRIOR_ORDER` whose plan fits the budget left; the best one shrunk when only
    fewer epochs fit; else the probe."""
    configured = float(training_args.num_train_epochs)
    left = PLANNING_SHARE * evidence.budget_seconds - evidence.elapsed_seconds
    estimates: list[Estimate] = []
    best = True
    for strategy in PRIOR_ORDER[: PRIOR_ORDER.index("probe")]:
        if TIMED_AS[strategy] not in evidence.seconds_per_step:
            reason = evidence.unavailable.get(TIMED_AS[strategy], "not timed")
            estimates.append(Estimate(strategy, configured, 0, 0.0, 0.0, 0.0, unavailable=reason))
            continue
        planned = estimate(strategy, configured, evidence, training_args, strategy_args)
        planned.fits = planned.seconds <= left
        # Epochs that fit: the estimate is linear in the epochs (optimiser steps and scheduled evaluations).
        one, two = (estimate(strategy, e, evidence, training_args, strategy_args) for e in (1.0, 2.0))
        per_epoch = max(1e-9, two.seconds - one.seconds)
        base = one.seconds - per_epoch
        planned.epochs_that_fit = round(max(0.0, (left - base) / per_epoch), 2)
        estimates.append(planned)
        if planned.fits:
            why = (
                f"`{strategy}` is the best-ranked candidate whose whole plan ({configured:g} epochs) fits: "
                f"estimated {planned.seconds:.0f} s of the {left:.0f} s left (90 % of the budget)."
            )
            if not best:
                why += " The better-ranked candidates above did not fit."
            return Decision(strategy, configured, why, estimates, evidence, configured)
        shrunk = math.floor(planned.epochs_that_fit * 10) / 10
        if best and shrunk >= MIN_SHRUNK_EPOCHS and (training_args.max_steps or 0) <= 0:
            shrunk_estimate = estimate(strategy, shrunk, evidence, training_args, strategy_args)
            shrunk_estimate.fits, shrunk_estimate.epochs_that_fit = True, planned.epochs_that_fit
            estimates.append(shrunk_estimate)
            why = (
                f"`{strategy}` is the best-ranked candidate; its {configured:g} epochs would take about "
                f"{planned.seconds:.0f} s with {left:.0f} s left, so it runs {shrunk:g} epochs (estimated "
                f"{shrunk_estimate.seconds:.0f} s) rather than giving way to a cheaper way."
            )
            return Decision(strategy, shrunk, why, estimates, evidence, configured)
        best = False
    why = (
        f"No gradient candidate fits the {left:.0f} s left (90 % of the budget, less "
        f"{evidence.elapsed_seconds:.0f} s spent measuring), even with {MIN_SHRUNK_EPOCHS:g} epoch: the probe "
        "already fitted (validation accuracy "
        + (f"{evidence.probe_eval_accuracy:.4f}" if evidence.probe_eval_accuracy is not None else "n/a")
        + ") is the model."
    )
    return Decision("probe", None, why, estimates, evidence, configured)


def card_section(record: dict):
    from hf_finetune.outputs.card import CardSection

    measured = record["measured"]
    steps = ", ".join(f"`{k}` {v:.3f} s" for k, v in measured["seconds_per_step"].items()) or "none"
    rows = ["| candidate | epochs | optimiser steps | estimate (s) | fits |", "|---|---|---|---|---|"]
    for c in record["candidates"]:
        if c["unavailable"]:
            rows.append(f"| `{c['strategy']}` | - | - | - | unavailable: {c['unavailable'][:80]} |")
        else:
            rows.append(
                f"| `{c['strategy']}` | {c['epochs']:g} | {c['optimizer_steps']} | {c['estimate_seconds']:.0f} | "
                f"{'yes' if c['fits'] else 'no'} (up to {c['epochs_that_fit']:g} epochs) |"
            )
    probe_accuracy = measured["probe_eval_accuracy"]
    guard = record["budget_guard_stopped_at_step"]
    body = "\n".join([
        f"Trained with `strategy: auto` and `time_budget_minutes: {record['time_budget_minutes']:g}`: chosen "
        f"**`{record['chosen']}`**" + (f", {record['epochs']:g} epochs" if record["epochs"] else "") + ".",
        "",
        record["why"],
        "",
        f"Measured on this run: the probe ({measured['probe_seconds']:.1f} s, validation accuracy "
        + (f"{probe_accuracy:.4f}" if probe_accuracy is not None else "n/a")
        + f"); seconds per optimiser step after {measured['warmup_steps']} warm-up step, median of "
        f"{measured['timed_steps']}: {steps}; evaluation {measured['eval_seconds_per_image'] * 1000:.1f} ms per "
        f"image; {measured['elapsed_seconds']:.0f} s spent before the choice. Whole run: "
        f"{record['total_seconds']:.0f} s of the {record['time_budget_minutes'] * 60:.0f} s budget"
        + (f"; the budget guard stopped training at step {guard}." if guard else "."),
        "",
        *rows,
        "",
        record["prior_note"],
    ])  # fmt: skip
    return CardSection("How `auto` chose the strategy", body)
