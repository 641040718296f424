"""Calibration: ECE on hand-made arrays, temperature fitting on synthetic logits, what a run writes, what
predict applies, and ECE before / after on the real EfficientNet-Lite0 for full fine-tuning and the probe."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import digits_dataset, run_training, write_digits_folder
from datasets import DatasetDict

from hf_finetune.outputs.reliability import CALIBRATION_FILE, RELIABILITY_DIAGRAM
from hf_finetune.train.calibration import (
    TEMPERATURE_KEY,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    rescale_probabilities,
    scaled_probabilities,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABELS = ["zero", "one", "two"]


# --------------------------------------------------------------------------------------------------------
# The numbers, on arrays with known answers
# --------------------------------------------------------------------------------------------------------
def test_ece_of_hand_made_arrays():
    # Two bins: top probability 0.9 (half right: gap 0.4) and 0.7 (all right: gap 0.3), two rows each.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)

    # Calibrated: ten rows scored 0.8, eight of them right.
    probabilities = np.tile([0.8, 0.1, 0.1], (10, 1))
    labels = np.array([0] * 8 + [1, 2])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-12)

    # One bin (0.8, 0.8667] holding 0.81 (right) and 0.85 (wrong): |0.5 - 0.83| for the bin, not the mean of
    # the per-row gaps (0.52), which is what distinguishes ECE from a mean absolute error.
    probabilities = np.array([[0.81, 0.19], [0.85, 0.15]])
    assert expected_calibration_error(probabilities, np.array([0, 1])) == pytest.approx(0.33)

    # Always right at 0.6 and 1.0 -> gaps 0.4 and 0, weighted 3 : 1.
    probabilities = np.array([[0.6, 0.4]] * 3 + [[1.0, 0.0]])
    assert expected_calibration_error(probabilities, np.zeros(4, dtype=int)) == pytest.approx(0.75 * 0.4)


def test_reliability_bins_are_fifteen_equal_width_bins_of_the_top_probability():
    probabilities = np.array([[0.95, 0.05], [0.5, 0.5], [0.34, 0.66]])
    table = reliability_bins(probabilities, np.array([0, 1, 1]))
    assert len(table["count"]) == 15 and table["upper"][-1] == 1.0
    assert sum(table["count"]) == 3
    # 0.95 in (14/15, 1], 0.66 in (9/15, 10/15], 0.5 in (7/15, 8/15].
    assert table["count"][14] == 1 and table["count"][9] == 1 and table["count"][7] == 1
    assert table["accuracy"][14] == 1.0 and table["confidence"][9] == pytest.approx(0.66)
    assert table["accuracy"][0] is None


def _synthetic(rows=4000, classes=10, seed=0):
    """Logits whose softmax is the true distribution the labels are drawn from (a calibrated model)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, classes)) * 2.0
    probabilities = scaled_probabilities(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return logits, labels


@pytest.mark.parametrize("scale", [3.0, 1.0, 0.5])
def test_temperature_fitting_recovers_a_known_temperature(scale):
    logits, labels = _synthetic()
    temperature = fit_temperature(logits * scale, labels)
    assert temperature == pytest.approx(scale, rel=0.06)
    # Scaled back, the model is calibrated again, and the NLL is the true logits' one.
    assert negative_log_likelihood(logits * scale, labels, temperature) == pytest.approx(
        negative_log_likelihood(logits, labels), rel=1e-3
    )


def test_calibrate_fits_on_validation_and_measures_on_test_without_changing_predictions():
    logits, labels = _synthetic(6000)
    val, test = (logits[:3000] * 3, labels[:3000]), (logits[3000:] * 3, labels[3000:])
    calibration = calibrate(val, test)
    assert calibration.temperature == pytest.approx(3.0, rel=0.08)
    assert calibration.split == "test" and calibration.samples == 3000
    assert calibration.ece_calibrated < calibration.ece / 3  # overconfident by 3x, then nearly calibrated
    assert calibration.nll_calibrated < calibration.nll
    before, after = scaled_probabilities(test[0]), scaled_probabilities(test[0], calibration.temperature)
    assert (before.argmax(1) == after.argmax(1)).all()
    assert calibration.metrics() == {
        "eval_ece": pytest.approx(calibration.eval_ece, abs=1e-6),
        TEMPERATURE_KEY: pytest.approx(calibration.temperature, abs=1e-6),
        "test_ece": pytest.approx(calibration.ece, abs=1e-6),
        "test_ece_calibrated": pytest.approx(calibration.ece_calibrated, abs=1e-6),
    }


def test_a_temperature_fitted_elsewhere_is_kept_only_if_it_lowers_the_validation_nll(caplog):
    """A probe's T: fitted on out-of-fold predictions (`fit_on`), checked on validation, which it did not see."""
    logits, labels = _synthetic(9000)
    fit, val, test = ((logits[k : k + 3000], labels[k : k + 3000]) for k in (0, 3000, 6000))
    # The same 2x overconfidence everywhere: T = 2 found on the folds, kept (it lowers the validation NLL).
    calibration = calibrate(
        (val[0] * 2, val[1]), (test[0] * 2, test[1]), fit_on=(fit[0] * 2, fit[1], "folds")
    )
    assert calibration.temperature == pytest.approx(2.0, rel=0.08)
    assert calibration.fitted_on.startswith("folds, checked on the validation split")
    assert calibration.ece_calibrated < calibration.ece
    # Folds more overconfident than the model (as a model fitted on less data can be): their T = 3 would
    # make the calibrated validation split underconfident, so T stays 1.
    with caplog.at_level(logging.INFO, logger="hf_finetune.train.calibration"):
        kept = calibrate(val, test, fit_on=(fit[0] * 3, fit[1], "folds"))
    assert kept.temperature == 1.0 and kept.ece_calibrated == kept.ece
    assert "raises the validation NLL" in caplog.text and "T = 1 kept" in kept.fitted_on


def test_temperature_of_probabilities_is_that_of_their_logits():
    """A probe gives probabilities: softmax(log p / T) is exactly softmax(z / T) for p = softmax(z)."""
    logits, _ = _synthetic(50)
    np.testing.assert_allclose(
        rescale_probabilities(scaled_probabilities(logits), 2.5), scaled_probabilities(logits, 2.5), rtol=1e-9
    )


def test_no_validation_split_is_a_logged_skip(caplog):
    with caplog.at_level(logging.INFO, logger="hf_finetune.train.calibration"):
        assert calibrate(None) is None
        assert calibrate((np.zeros((0, 3)), np.zeros(0, dtype=int))) is None
    assert caplog.text.count("Calibration skipped: the run has no validation split") == 2


# --------------------------------------------------------------------------------------------------------
# A tiny run: keys, diagram, config.json; predict applies T
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_vit):
    out = tmp_path_factory.mktemp("calibrated") / "out"
    splits = DatasetDict(
        {
            "train": digits_dataset(12, names=LABELS),
            "validation": digits_dataset(6, names=LABELS, offset=12),
            "test": digits_dataset(6, names=LABELS, offset=18),
        }
    )
    argv = [
        "--model_name_or_path", str(tiny_vit), "--output_dir", str(out), "--num_train_epochs", "12", "--learning_rate", "0.003",
        "--random_resized_crop_scale", "0.7", "1.0", "--horizontal_flip", "false",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--seed", "0", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false",
    ]  # fmt: skip
    return out, run_training(argv, dataset=splits)


def test_a_run_writes_the_keys_the_diagram_and_the_temperature(tiny_run):
    out, results = tiny_run
    written = json.loads((out / "all_results.json").read_text())
    for key in ("test_ece", "test_ece_calibrated", "eval_ece", TEMPERATURE_KEY):
        assert key in written and written[key] == results[key]
    assert 0 <= written["test_ece_calibrated"] <= 1 and written[TEMPERATURE_KEY] > 0
    assert set(json.loads((out / "test_results.json").read_text())) >= {"test_ece", "test_ece_calibrated"}
    assert (out / RELIABILITY_DIAGRAM).read_bytes().startswith(b"\x89PNG")
    details = json.loads((out / CALIBRATION_FILE).read_text())
    assert details["split"] == "test" and details["samples"] == 18 and details["saved_in"] == "config.json"
    assert sum(details["reliability"]["after"]["count"]) == 18
    config = json.loads((out / "config.json").read_text())
    assert config[TEMPERATURE_KEY] == pytest.approx(written[TEMPERATURE_KEY], abs=1e-6)
    card = (out / "README.md").read_text()
    assert "## Calibration" in card and f"{written['test_ece']:.4f}" in card and RELIABILITY_DIAGRAM in card
    # transformers keeps the key: a loaded model carries T for the user.
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).calibration_temperature == config[TEMPERATURE_KEY]
    manifest = json.loads((out / ".hf_finetune_manifest.json").read_text())
    assert {RELIABILITY_DIAGRAM, CALIBRATION_FILE} <= set(manifest["entries"])


def test_predict_divides_the_logits_by_the_temperature(tiny_run, tmp_path):
    from hf_finetune.commands.predict import predict_paths

    out, results = tiny_run
    pictures = write_digits_folder(tmp_path / "pictures", 2, offset=30)
    calibrated = predict_paths(out, [pictures], top_k=3, device="cpu")
    raw = predict_paths(out, [pictures], top_k=3, device="cpu", calibrated=False)
    temperature = results[TEMPERATURE_KEY]
    # A fitted T, not the edge of the search range (a model no better than chance would give T = 100), and not 1
    # (then the two would agree for no reason).
    assert 0.05 < temperature < 20 and abs(temperature - 1.0) > 1e-3
    for with_t, without in zip(calibrated, raw, strict=True):
        assert with_t["labels"][0] == without["labels"][0]
        order = [without["labels"].index(label) for label in LABELS]
        p_raw = np.array([without["scores"][i] for i in order])
        p_cal = np.array([with_t["scores"][with_t["labels"].index(label)] for label in LABELS])
        # softmax(z / T) from softmax(z): exactly T apart.
        np.testing.assert_allclose(p_cal, rescale_probabilities(p_raw[None], temperature)[0], rtol=1e-5)
        assert not np.allclose(p_cal, p_raw)


# --------------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------------
def _probe(out, checkpoint, dataset, cache, **overrides):
    from hf_finetune.probe.arguments import parse_probe_args
    from hf_finetune.probe.run import run_probe

    argv = [
        "--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--feature_cache_dir", str(cache),
        "--train_test_split", "0.25", "--train_val_split", "0.2", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--seed", "0",
    ]  # fmt: skip
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return run_probe(*parse_probe_args(argv), dataset=dataset)


def test_probe_directory_keeps_the_temperature_in_probe_json_and_predict_applies_it(tmp_path, tiny_vit):
    from hf_finetune.commands.predict import predict_paths
    from hf_finetune.probe.export import PROBE_FILE
    from hf_finetune.probe.load import load_probe

    dataset = digits_dataset(16, names=LABELS)
    out = tmp_path / "nb"
    results = _probe(out, tiny_vit, dataset, tmp_path / "cache", classifier="gaussian_nb")
    temperature = results[TEMPERATURE_KEY]
    assert {"test_ece", "test_ece_calibrated", "eval_ece"} <= set(results)
    assert json.loads((out / PROBE_FILE).read_text())[TEMPERATURE_KEY] == pytest.approx(temperature, abs=1e-6)
    assert (out / RELIABILITY_DIAGRAM).is_file() and "## Calibration" in (out / "README.md").read_text()
    # The card says where T really is (the section is written after T is saved).
    calibration_section = (out / "README.md").read_text().split("## Calibration", 1)[1]
    assert f"`{TEMPERATURE_KEY}` in `{PROBE_FILE}`" in calibration_section
    assert "`hf-finetune predict` applies T; `load_probe(...)" in calibration_section

    pictures = write_digits_folder(tmp_path / "pictures", 1, offset=40)
    rows = predict_paths(out, [pictures], top_k=3, device="cpu")
    from PIL import Image

    raw = load_probe(out).probabilities([Image.open(row["path"]).convert("RGB") for row in rows])
    for row, p_raw in zip(rows, rescale_probabilities(raw, temperature), strict=True):
        np.testing.assert_allclose(
            row["scores"], [p_raw[LABELS.index(label)] for label in row["labels"]], rtol=1e-5
        )


def test_refit_probe_skips_calibration_with_a_log_line(tmp_path, tiny_vit, caplog):
    dataset = digits_dataset(16, names=LABELS)
    with caplog.at_level(logging.INFO, logger="hf_finetune.train.calibration"):
        results = _probe(
            tmp_path / "refit", tiny_vit, dataset, tmp_path / "cache", refit_on_validation="true"
        )
    assert "Calibration skipped: refit_on_validation" in caplog.text
    assert not {"test_ece", TEMPERATURE_KEY} & set(results)
    assert not (tmp_path / "refit" / RELIABILITY_DIAGRAM).exists()
    assert TEMPERATURE_KEY not in json.loads((tmp_path / "refit" / "config.json").read_text())


# --------------------------------------------------------------------------------------------------------
# Real weights: ECE after <= ECE before on the test split
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    # 64 px, as benchmarks/calibration.py. At 32 px the probe's test ECE rose (0.068 -> 0.076) while the test
    # NLL, which T minimises, fell (0.575 -> 0.537): see README, "Calibration".
    folder = tmp_path_factory.mktemp("lite0") / "lite0"
    return convert_efficientnet_lite("lite0", folder, image_size=64, crop_pct=1.0)


REAL_SPLITS = ["--train_val_split", "0.15", "--train_test_split", "0.15", "--seed", "42", "--use_cpu", "true",
               "--dataloader_num_workers", "0"]  # fmt: skip


def assert_calibration_helps(output_dir, results):
    assert results["test_ece_calibrated"] <= results["test_ece"]
    details = json.loads((output_dir / CALIBRATION_FILE).read_text())
    assert details["split"] == "test" and details["samples"] == 270
    assert details["nll_calibrated"] <= details["nll"]


@pytest.mark.slow
def test_real_lite0_full_fine_tuning_ece_does_not_rise(tmp_path, lite0, digits_folder):
    """benchmarks/real_transfer.py's `full` row (2 epochs of batch 64 = 40 steps)."""
    results = run_training(
        ["--model_name_or_path", str(lite0), "--train_dir", str(digits_folder), "--output_dir", str(tmp_path / "full"),
         *REAL_SPLITS, "--strategy", "full", "--freeze_modules", r"\.bn\d\.", "--learning_rate", "2e-4",
         "--max_steps", "40", "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256",
         "--weight_decay", "0.05", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
         "--random_resized_crop_scale", "0.6", "1.0", "--horizontal_flip", "false",
         "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"]
    )  # fmt: skip
    assert results["test_accuracy"] > 0.8  # a model that learned, so that its calibration means something
    assert_calibration_helps(tmp_path / "full", results)


@pytest.mark.slow
def test_real_lite0_probe_ece_does_not_rise(tmp_path, lite0, digits_folder):
    """An underconfident probe (C = 0.01, strong regularisation) is repaired by scaling (T fitted on
    out-of-fold predictions on train, checked on validation; see README, "Calibration")."""
    from hf_finetune.probe.arguments import parse_probe_args
    from hf_finetune.probe.run import run_probe

    argv = ["--model_name_or_path", str(lite0), "--train_dir", str(digits_folder), "--output_dir",
            str(tmp_path / "probe"), "--feature_cache_dir", str(tmp_path / "cache"), "--c_values", "0.01",
            *REAL_SPLITS]  # fmt: skip
    results = run_probe(*parse_probe_args(argv))
    assert results["test_accuracy"] > 0.9
    assert results[TEMPERATURE_KEY] < 1  # underconfident: scaling sharpens it
    assert_calibration_helps(tmp_path / "probe", results)


def test_an_uncalibrated_run_drops_the_temperature_its_checkpoint_carried(tmp_path):
    from hf_finetune.outputs.reliability import write_calibration
    from hf_finetune.train.calibration import load_temperature, save_temperature

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    save_temperature(tmp_path, 2.0)
    assert load_temperature(tmp_path) == 2.0
    write_calibration(tmp_path, None)
    assert load_temperature(tmp_path) is None
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "vit"}


def test_the_readme_recipe_for_pipeline_users_gives_predicts_scores(tiny_run, tmp_path):
    """README, "Calibration": logits / T before the softmax, or softmax(log p / T) on pipeline()'s scores."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from hf_finetune.commands.predict import predict_paths

    out, _ = tiny_run
    pictures = write_digits_folder(tmp_path / "pictures", 1, offset=30)
    rows = predict_paths(out, [pictures], top_k=3, device="cpu")
    images = [Image.open(row["path"]).convert("RGB") for row in rows]
    expected = np.array([[row["scores"][row["labels"].index(label)] for label in LABELS] for row in rows])

    model = AutoModelForImageClassification.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    temperature = getattr(model.config, "calibration_temperature", 1.0)
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    probabilities = torch.softmax(logits / temperature, dim=-1)
    np.testing.assert_allclose(probabilities.numpy(), expected, rtol=1e-4)

    classifier = pipeline("image-classification", model=str(out))
    answers = classifier(images, top_k=model.config.num_labels)
    p = np.array(
        [[next(a["score"] for a in answer if a["label"] == label) for label in LABELS] for answer in answers]
    )
    np.testing.assert_allclose(rescale_probabilities(p, temperature), expected, rtol=1e-4)


def test_predict_command_line_no_calibration_flag(tiny_run, tmp_path):
    from hf_finetune.commands.predict import main, predict_paths

    out, _ = tiny_run
    pictures = write_digits_folder(tmp_path / "pictures", 1, offset=30)
    for flags, calibrated in (([], True), (["--no_calibration"], False)):
        target = tmp_path / f"{calibrated}.json"
        main([str(out), str(pictures), "--top_k", "3", "--device", "cpu", "--output", str(target), *flags])
        expected = predict_paths(out, [pictures], top_k=3, device="cpu", calibrated=calibrated)
        rows = json.loads(target.read_text())
        np.testing.assert_allclose([r["scores"] for r in rows], [r["scores"] for r in expected], atol=1e-6)
    assert json.loads((tmp_path / "True.json").read_text()) != json.loads(
        (tmp_path / "False.json").read_text()
    )
