"""The time budget of a run: seconds per phase, from the process start to the metrics written, in the log and in
run_summary.json (`time_budget`).

A short run spends much of its time outside the training steps (start-up imports, the image check, the
model load, per-epoch evaluation, the reports and the card); the budget shows where, so that the optional
parts can be turned off where they do not pay (README, "Time budget"). The phases are measured where they
happen: `TimeBudget.phase` around each stage of `train.run`, and `BudgetCallback` inside training, where
the Trainer's own per-epoch evaluations, checkpoint saves and the best-model reload are taken out of the
training steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time

logger = logging.getLogger(__name__)

# `start-up` is measured from the process's own start time (imports, argument parsing, the launcher's
# environment); when the operating system does not say, from when this module was first imported.
_IMPORTED_AT = time.time()

LAUNCHER = "launcher start-up (accelerate launch)"
START_UP = "start-up (imports, settings)"
# The phases measured inside others: the image check inside the data stage, and what the Trainer does inside
# `train()` besides the steps.
DATA_PHASE = "data: load, split, attach transforms"
IMAGE_CHECK = "image check (and downscaled copies)"
TRAINING_STEPS = "training steps"
PER_EPOCH_EVALUATION = "per-epoch evaluation"
CHECKPOINT_SAVES = "checkpoint saves"
BEST_MODEL_RELOAD = "best-model reload"


def process_start_time() -> float:
    """The epoch time this process started (psutil, else Linux's /proc), else when this module was imported."""
    with contextlib.suppress(Exception):
        import psutil

        return psutil.Process(os.getpid()).create_time()
    with contextlib.suppress(Exception):
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as handle:
            started = int(handle.read().rsplit(")", 1)[1].split()[19]) / ticks  # seconds after boot
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + started
    return _IMPORTED_AT


def launcher_start_time() -> float | None:
    """When `accelerate launch` / torchrun (the parent of a launched process, which has LOCAL_RANK set)
    started; None when this process was not launched so, or psutil is not installed."""
    if "LOCAL_RANK" not in os.environ:
        return None
    with contextlib.suppress(Exception):
        import psutil

        return psutil.Process(os.getpid()).parent().create_time()
    return None


class TimeBudget:
    """Seconds per phase of one run, in the order they were first entered. A phase entered twice adds up."""

    def __init__(self, started_at: float | None = None):
        self.started_at = process_start_time() if started_at is None else started_at
        self.phases: dict[str, float] = {}
        launcher = launcher_start_time()
        if launcher is not None and launcher < self.started_at:
            # `accelerate launch` (torchrun) imports and starts before it starts this process.
            self.add(LAUNCHER, self.started_at - launcher)
            self.started_at = launcher
        self.add(START_UP, time.time() - self.started_at - self.phases.get(LAUNCHER, 0.0))

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    def take_out(self, name: str, part: str, seconds: float) -> None:
        """`seconds` of phase `name` (running or ended) belong to phase `part`. A running phase is added when
        it ends, so it is briefly negative here; it is listed before its part either way."""
        self.phases[name] = self.phases.get(name, 0.0) - max(0.0, seconds)
        self.add(part, seconds)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def total(self) -> float:
        return sum(self.phases.values())

    def as_dict(self) -> dict:
        """For run_summary.json: seconds per phase, their total and the wall time since the process started
        (the difference is what no phase covers)."""
        return {
            "seconds": {name: round(seconds, 2) for name, seconds in self.phases.items()},
            "total_s": round(self.total(), 2),
            "wall_s": round(time.time() - self.started_at, 2),
        }

    def log(self) -> None:
        total = self.total() or 1.0
        lines = [
            f"  {name:<34} {seconds:8.1f} s  {100 * seconds / total:5.1f} %"
            for name, seconds in self.phases.items()
        ]
        logger.info("Time budget (seconds per phase, %.1f s in all):\n%s", self.total(), "\n".join(lines))


# The budget of the run in progress, so that a stage deep inside another (the image check inside the data stage)
# can time itself without every function in between passing the budget on.
_current: contextvars.ContextVar = contextvars.ContextVar("time_budget", default=None)


@contextlib.contextmanager
def active(budget: TimeBudget):
    """Make `budget` the one `timed` adds to, for the duration of the block."""
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)


@contextlib.contextmanager
def timed(name: str, within: str | None = None):
    """Time the block as phase `name` of the active budget (nothing without one). `within`: the enclosing phase
    the block is part of, whose time it is taken out of (so that the phases still add up to the run)."""
    budget = _current.get()
    start = time.perf_counter()
    try:
        yield
    finally:
        if budget is not None:
            seconds = time.perf_counter() - start
            if within is not None:
                budget.take_out(within, name, seconds)
            else:
                budget.add(name, seconds)


def budget_callback():
    """A `TrainerCallback` timing what the Trainer does inside `train()` besides the steps: each evaluation
    (the evaluations' own runtime, which the Trainer reports), each checkpoint save (from the end of the step's
    evaluation or step to `on_save`) and the end of training (the best-model reload, after the last save)."""
    from transformers import TrainerCallback

    class BudgetCallback(TrainerCallback):
        def __init__(self):
            self.evaluation_s = self.save_s = self.end_s = 0.0
            self._mark = None

        def on_step_end(self, args, state, control, **kwargs):
            self._mark = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evaluation_s += float((metrics or {}).get("eval_runtime", 0.0))
            self._mark = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            if self._mark is not None:
                self.save_s += time.perf_counter() - self._mark
            self._mark = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            self._mark = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            # The Trainer logs its train metrics, then reloads the best checkpoint, then calls this.
            if self._mark is not None:
                self.end_s += time.perf_counter() - self._mark

    return BudgetCallback()


def split_training(callback) -> None:
    """Take the per-epoch evaluations, checkpoint saves and best-model reload out of the training phase."""
    budget = _current.get()
    if budget is None:
        return
    parts = {PER_EPOCH_EVALUATION: callback.evaluation_s, CHECKPOINT_SAVES: callback.save_s,
             BEST_MODEL_RELOAD: callback.end_s}  # fmt: skip
    for part, seconds in parts.items():
        if seconds:
            budget.take_out(TRAINING_STEPS, part, seconds)
