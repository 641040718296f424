"""The time budget of a run (seconds per phase in run_summary.json and the log), and the final validation
evaluation made once: from the per-epoch pass of the final weights when there is one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_dataset, tiny_run

from hf_finetune.time_budget import (
    BEST_MODEL_RELOAD,
    DATA_PHASE,
    IMAGE_CHECK,
    PER_EPOCH_EVALUATION,
    START_UP,
    TRAINING_STEPS,
    TimeBudget,
    active,
    timed,
)

REPO = Path(__file__).resolve().parent.parent


def test_timed_phases_add_up_and_an_inner_phase_is_taken_out_of_its_enclosing_one():
    budget = TimeBudget(started_at=time.time())
    with active(budget):
        with timed("outer"):
            time.sleep(0.05)
            with timed("inner", within="outer"):
                time.sleep(0.1)
        with timed("outer"):  # entered twice: adds up
            time.sleep(0.05)
    with timed("ignored"):  # no active budget: nothing is recorded
        pass
    assert list(budget.phases) == [START_UP, "outer", "inner"]
    assert budget.phases["inner"] == pytest.approx(0.1, abs=0.05)
    assert budget.phases["outer"] == pytest.approx(0.1, abs=0.05)
    summary = budget.as_dict()
    assert summary["total_s"] == pytest.approx(summary["wall_s"], abs=0.05)


def _count_validation_passes(monkeypatch):
    """Counts the evaluation loops over the validation split (per-epoch evaluations and final ones)."""
    from transformers import Trainer

    counts = {"validation": 0, "other": 0}
    original = Trainer.evaluation_loop

    def counting(self, dataloader, *args, **kwargs):
        is_validation = dataloader.dataset is self.eval_dataset
        counts["validation" if is_validation else "other"] += 1
        return original(self, dataloader, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluation_loop", counting)
    return counts


@pytest.mark.parametrize("load_best", ["false", "true"])
def test_final_validation_reuses_the_per_epoch_pass_of_the_final_weights(
    tmp_path, tiny_vit, monkeypatch, load_best
):
    data = digits_dataset(12)
    counts = _count_validation_passes(monkeypatch)
    flags = ["--eval_strategy", "epoch", "--train_val_split", "0.25", "--load_best_model_at_end", load_best,
             "--save_strategy", "epoch" if load_best == "true" else "no"]  # fmt: skip
    results = tiny_run(tiny_vit, tmp_path / "run", data, *flags, epochs=2)
    # Two per-epoch evaluations and none at the end (the calibration reuses the same logits).
    assert counts["validation"] == 2
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    per_epoch = [entry for entry in history if "eval_accuracy" in entry]
    # The final metrics are those of the evaluation of the final weights (the best one's, with the reload).
    chosen = max(per_epoch[:2], key=lambda e: e["eval_accuracy"]) if load_best == "true" else per_epoch[1]
    assert results["eval_accuracy"] == chosen["eval_accuracy"]
    assert results["eval_loss"] == chosen["eval_loss"]
    assert "calibration_temperature" in results


def test_final_validation_matches_a_fresh_evaluation(tmp_path, tiny_vit, monkeypatch):
    """The reused pass gives exactly what evaluating the saved model again gives."""
    from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

    from hf_finetune.data.transforms import Collator

    data = digits_dataset(12)
    captured = {}
    import hf_finetune.train.run as run_module

    original = run_module.evaluate_splits

    def capture(trainer, splits, *args, **kwargs):
        captured["validation"] = splits["validation"]
        return original(trainer, splits, *args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_splits", capture)
    results = tiny_run(
        tiny_vit, tmp_path / "run", data, "--eval_strategy", "epoch", "--train_val_split", "0.25"
    )
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "run")
    args = TrainingArguments(tmp_path / "again", use_cpu=True, report_to="none", remove_unused_columns=False)
    fresh = Trainer(model=model, args=args, data_collator=Collator(False)).predict(captured["validation"])
    accuracy = float(np.mean(fresh.predictions.argmax(-1) == fresh.label_ids))
    assert results["eval_accuracy"] == pytest.approx(accuracy)
    assert results["eval_loss"] == pytest.approx(fresh.metrics["test_loss"], rel=1e-5)


def test_ema_runs_evaluate_the_final_weights_again(tmp_path, tiny_vit, monkeypatch):
    counts = _count_validation_passes(monkeypatch)
    tiny_run(tiny_vit, tmp_path / "run", digits_dataset(12), "--eval_strategy", "epoch", "--train_val_split",
             "0.25", "--ema", "true")  # fmt: skip
    # One per-epoch evaluation, the EMA choice (the average and the raw weights), and one final pass.
    assert counts["validation"] == 4


@pytest.mark.slow
def test_the_budget_of_a_command_line_run_covers_its_wall_time(tmp_path, tiny_vit, small_digits_folder):
    """A real `hf-finetune train` process: every phase listed, and the phases add up to the process's wall time
    less its exit (interpreter and worker shut-down)."""
    output = tmp_path / "out"
    command = [sys.executable, "-m", "hf_finetune.commands.cli", "train", "--model_name_or_path", str(tiny_vit),
               "--train_dir", str(small_digits_folder), "--output_dir", str(output), "--num_train_epochs", "2",
               "--use_cpu", "true", "--dataloader_num_workers", "1"]  # fmt: skip
    start = time.time()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_offline_env())
    wall = time.time() - start
    assert done.returncode == 0, done.stderr[-3000:]
    budget = json.loads((output / "run_summary.json").read_text())["time_budget"]
    phases = budget["seconds"]
    for name in (START_UP, DATA_PHASE, IMAGE_CHECK, "model load", TRAINING_STEPS, PER_EPOCH_EVALUATION,
                 "checkpoint saves", BEST_MODEL_RELOAD, "final evaluation (validation, test)",
                 "reports (plots, tables, error grid)", "model card"):  # fmt: skip
        assert name in phases, (name, phases)
    assert all(seconds >= 0 for seconds in phases.values())
    assert budget["total_s"] == pytest.approx(sum(phases.values()), abs=0.1)
    # Start-up is counted from the process's start (to the second), the end at the metrics' writing.
    assert budget["total_s"] == pytest.approx(budget["wall_s"], abs=1.5)
    assert 0.7 * wall - 1.5 <= budget["total_s"] <= wall + 1.0
    assert "Time budget (seconds per phase" in done.stderr + done.stdout


def _offline_env() -> dict:
    import os

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


def test_report_plots_false_draws_no_figure_and_never_imports_matplotlib(
    tmp_path, tiny_vit, small_digits_folder
):
    """The optional figures cost matplotlib's import and their drawing; `--report_plots false` pays neither,
    and the run still writes its tables, calibration and a card that links nothing missing."""
    output = tmp_path / "out"
    command = [sys.executable, "-X", "importtime", "-m", "hf_finetune.commands.cli", "train",
               "--model_name_or_path", str(tiny_vit), "--train_dir", str(small_digits_folder),
               "--output_dir", str(output), "--num_train_epochs", "1", "--use_cpu", "true",
               "--dataloader_num_workers", "0", "--report_plots", "false"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_offline_env())
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "torch" in imported and not {name for name in imported if name.split(".")[0] == "matplotlib"}
    assert sorted(path.name for path in output.rglob("*.png")) == []
    assert (output / "validation_classification_report.json").is_file()
    assert (output / "validation_classification_report.md").is_file()
    calibration = json.loads((output / "calibration.json").read_text())
    assert calibration["diagram"] is False and calibration["temperature"] > 0
    card = (output / "README.md").read_text()
    assert "## Calibration" in card and ".png" not in card
