"""`strategy: auto`: the choice from measured step times and the budget, the evidence in run_summary.json and the
card, the same model as the strategy it picks, and one choice for every process of a launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import CHECKPOINT_LABELS, REPO, digits_dataset, tiny_run

from hf_finetune.errors import UserError
from hf_finetune.outputs.files import RUN_SUMMARY
from hf_finetune.strategies.arguments import StrategyArguments
from hf_finetune.strategies.auto_choice import MIN_SHRUNK_EPOCHS, PRIOR_ORDER, Evidence, choose

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The choice, on given figures --------------------------------------------------------------------------
def _evidence(budget_seconds: float, **changes) -> Evidence:
    figures = {
        "elapsed_seconds": 20.0, "probe_eval_accuracy": 0.9, "probe_fit_seconds": 2.0, "prepare_seconds": 5.0,
        "seconds_per_step": {"full": 1.0, "last_n": 0.5}, "steps_per_epoch": 40,
        "eval_seconds_per_image": 0.01, "eval_images": 100, "test_images": 100,
    }  # fmt: skip
    return Evidence(budget_seconds=budget_seconds, **{**figures, **changes})


def _arguments(epochs=3.0, eval_strategy="epoch"):
    training = SimpleNamespace(num_train_epochs=epochs, max_steps=-1, eval_strategy=eval_strategy,
                               eval_steps=None, ema=False)  # fmt: skip
    return training, StrategyArguments()


def test_the_choice_follows_the_prior_when_everything_fits_and_the_probe_when_nothing_does():
    training, strategy = _arguments()
    # lp_ft, 3 epochs: 120 steps x 1 s + (3 + 2) x 100 x 0.01 s + 100 x 0.01 s + fixed (5 + 15 + 2 s) = 148 s.
    big = choose(_evidence(1000.0), training, strategy)
    assert (big.strategy, big.epochs) == ("lp_ft", 3.0)
    assert big.estimates[0].seconds == pytest.approx(148.0)
    assert big.record()["candidates"][0]["fits"] is True

    tiny = choose(_evidence(30.0), training, strategy)
    assert tiny.strategy == "probe" and tiny.epochs is None
    assert [e.strategy for e in tiny.estimates] == list(PRIOR_ORDER[: PRIOR_ORDER.index("probe")])
    assert not any(e.fits for e in tiny.estimates)


def test_the_best_candidate_runs_fewer_epochs_rather_than_giving_way():
    training, strategy = _arguments()
    # 0.9 x 140 - 20 = 106 s left: lp_ft's 3 epochs (148 s) do not fit; per epoch 41 s, base 25 s -> 1.97 epochs.
    decision = choose(_evidence(140.0), training, strategy)
    assert decision.strategy == "lp_ft" and decision.epochs == pytest.approx(1.9)
    assert decision.estimates[-1].seconds <= 0.9 * 140.0 - 20.0
    assert "1.9 epochs" in decision.why
    # Below one epoch the best candidate gives way; last_n (cheaper steps) still fits its whole plan here.
    cheaper = _evidence(140.0, seconds_per_step={"full": 3.0, "last_n": 0.2})
    decision = choose(cheaper, training, strategy)
    assert decision.strategy == "last_n" and decision.epochs == 3.0
    assert choose(cheaper, training, strategy).estimates[0].epochs_that_fit < MIN_SHRUNK_EPOCHS


def test_a_candidate_that_cannot_be_timed_is_reported_and_skipped():
    training, strategy = _arguments()
    evidence = _evidence(1000.0, seconds_per_step={"full": 1.0}, unavailable={"last_n": "no block map"})
    decision = choose(_evidence(60.0, seconds_per_step={"full": 50.0}, unavailable={"last_n": "no block map"}),
                      training, strategy)  # fmt: skip
    assert decision.strategy == "probe"
    assert decision.estimates[-1].unavailable == "no block map"
    assert choose(evidence, training, strategy).strategy == "lp_ft"


def test_the_budget_is_required_with_auto_and_refused_without_it():
    with pytest.raises(UserError, match="time_budget_minutes > 0"):
        StrategyArguments(strategy="auto")
    with pytest.raises(UserError, match="read only by strategy auto"):
        StrategyArguments(strategy="full", time_budget_minutes=5)
    assert StrategyArguments(strategy="auto", time_budget_minutes=0.5).time_budget_minutes == 0.5


# Whole runs on a tiny checkpoint -----------------------------------------------------------------------
@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FINETUNE_FEATURES_CACHE", str(tmp_path / "features"))
    return digits_dataset(n_per_class=16)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_tiny_budget_gives_the_probe_with_its_evidence(tmp_path, tiny_vit, tiny_data, monkeypatch):
    # The candidates are timed however long the probe took: on a loaded machine the probe alone can take half of
    # the 1.2 s budget, which skips the timing (the next test); this one checks the timed evidence.
    monkeypatch.setattr("hf_finetune.strategies.auto.SKIP_TIMING_FRACTION", float("inf"))
    out = tmp_path / "auto"
    results = tiny_run(tiny_vit, out, tiny_data, "--strategy", "auto", "--time_budget_minutes", "0.02",
                       "--train_val_split", "0.25", epochs=2)  # fmt: skip
    assert results["auto_strategy"] == "probe"
    summary = json.loads((out / RUN_SUMMARY).read_text())
    auto = summary["auto"]
    assert summary["strategy"].startswith("probe") and auto["chosen"] == "probe"
    assert auto["time_budget_minutes"] == pytest.approx(0.02)
    measured = auto["measured"]
    assert set(measured["seconds_per_step"]) == {"full", "last_n"}
    assert all(v > 0 for v in measured["seconds_per_step"].values())
    assert measured["steps_per_epoch"] == 5 and measured["eval_images"] == 12  # 36 train / batch 8; 12 val
    assert 0.0 < measured["probe_eval_accuracy"] <= 1.0
    assert all(not c["fits"] and c["estimate_seconds"] > 0 for c in auto["candidates"])
    card = (out / "README.md").read_text()
    assert "## How `auto` chose the strategy" in card and "chosen **`probe`**" in card
    assert "is a prior" in card and "| `lp_ft` | 2 |" in card
    assert results["eval_accuracy"] == pytest.approx(measured["probe_eval_accuracy"])


def test_a_probe_that_took_half_the_budget_skips_the_timing(tmp_path, tiny_vit, tiny_data, monkeypatch):
    monkeypatch.setattr("hf_finetune.strategies.auto.SKIP_TIMING_FRACTION", 0.0)  # any probe took "half"
    out = tmp_path / "auto"
    results = tiny_run(tiny_vit, out, tiny_data, "--strategy", "auto", "--time_budget_minutes", "5",
                       "--train_val_split", "0.25", epochs=2)  # fmt: skip
    assert results["auto_strategy"] == "probe"
    auto = json.loads((out / RUN_SUMMARY).read_text())["auto"]
    assert auto["chosen"] == "probe" and not auto["measured"]["seconds_per_step"]
    assert auto["candidates"] and all(
        not c["fits"] and "not timed: the probe alone took" in c["unavailable"] for c in auto["candidates"]
    )


def test_a_large_budget_gives_lp_ft_and_the_model_an_lp_ft_run_gives(tmp_path, tiny_vit, tiny_data):
    args = ("--train_val_split", "0.25", "--learning_rate", "0.001")
    auto_out, explicit_out = tmp_path / "auto", tmp_path / "lp_ft"
    results = tiny_run(tiny_vit, auto_out, tiny_data, "--strategy", "auto", "--time_budget_minutes", "60", *args,
                       epochs=2)  # fmt: skip
    explicit = tiny_run(tiny_vit, explicit_out, tiny_data, "--strategy", "lp_ft", *args, epochs=2)
    assert results["auto_strategy"] == "lp_ft"
    summary = json.loads((auto_out / RUN_SUMMARY).read_text())
    assert summary["strategy"] == "lp_ft" and summary["auto"]["epochs"] == 2.0
    assert summary["auto"]["candidates"][0]["fits"] is True
    assert "lp_ft_probe" in summary  # the chosen run is an ordinary lp_ft run
    # The timing touched only copies, and the run re-seeds: the same weights as `strategy: lp_ft`.
    auto_weights, explicit_weights = _weights(auto_out), _weights(explicit_out)
    assert auto_weights.keys() == explicit_weights.keys()
    assert all((auto_weights[k] == explicit_weights[k]).all() for k in auto_weights)
    assert results["eval_accuracy"] == explicit["eval_accuracy"]
    assert "chosen **`lp_ft`**, 2 epochs" in (auto_out / "README.md").read_text()


@pytest.mark.slow
def test_two_processes_make_one_choice(tmp_path):
    """Under accelerate launch every process measures; the figures are all-reduced so both run the same way."""
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("resnet", tmp_path / "tiny-resnet", CHECKPOINT_LABELS)
    data = tmp_path / "digits"
    for cls, name in enumerate(("zero", "one", "two")):
        (data / name).mkdir(parents=True)
        for i, image in enumerate(digits_dataset(24, classes=(cls,))["image"]):
            image.save(data / name / f"{i:03d}.png")
    out = tmp_path / "out"
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2",
        "-m", "hf_finetune.commands.cli", "train", "--model_name_or_path", str(checkpoint),
        "--train_dir", str(data), "--strategy", "auto", "--time_budget_minutes", "30", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--use_cpu", "true", "--save_strategy", "no", "--eval_strategy",
        "no", "--load_best_model_at_end", "false", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_FINETUNE_FEATURES_CACHE": str(tmp_path / "features")}  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / RUN_SUMMARY).read_text())
    assert summary["auto"]["chosen"] == "lp_ft" and summary["strategy"] == "lp_ft"
    strategy_summary = json.loads((out / "strategy_summary.json").read_text())
    assert strategy_summary["ddp"]["world_size"] == 2
    assert all(h["replicas_identical"] is True for h in strategy_summary["history"])
