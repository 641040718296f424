"""Evaluation reports: valid PNGs, per-class numbers identical to scikit-learn's, errors grid only of errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax
from sklearn.metrics import classification_report

from hf_finetune.outputs.reports import report_section, write_reports

NAMES = ["apple", "banana", "cherry", "date|fig"]  # a "|" must not break the Markdown table

# What Trainer.state.log_history looks like: per-step train logs, one eval per epoch, the run summary.
LOG_HISTORY = [
    {"loss": 1.4, "grad_norm": 3.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 5},
    {"loss": 1.1, "grad_norm": 2.0, "learning_rate": 8e-4, "epoch": 1.0, "step": 10},
    {"eval_loss": 1.2, "eval_accuracy": 0.45, "eval_macro_f1": 0.4, "epoch": 1.0, "step": 10},
    {"loss": 0.8, "learning_rate": 4e-4, "epoch": 1.5, "step": 15},
    {"loss": 0.6, "learning_rate": 0.0, "epoch": 2.0, "step": 20},
    {"eval_loss": 0.9, "eval_accuracy": 0.6, "epoch": 2.0, "step": 20},  # macro-F1 missing: fine
    {"train_runtime": 3.2, "train_loss": 0.97, "epoch": 2.0, "step": 20},
]


def synthetic(n: int = 40, classes: int = 4, seed: int = 0):
    """Logits that are right about 60% of the time, and a picture per row (some as undecoded bytes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += rng.choice([0.0, 3.0], n, p=[0.4, 0.6])
    images = []
    for i in range(n):
        picture = Image.new("RGB", (24, 16), tuple(int(v) for v in rng.integers(0, 255, 3)))
        if i % 2:
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": f"row{i}.png"})
        else:
            images.append(picture)
    return logits, labels, images


def is_png(path) -> bool:
    with Image.open(path) as image:
        image.load()
        return image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_all_reports_are_written_and_valid(tmp_path):
    logits, labels, images = synthetic()
    files = write_reports(
        tmp_path, logits=logits, labels=labels, label_names=NAMES, images=images, log_history=LOG_HISTORY
    )
    assert files == {
        "confusion_matrix": "confusion_matrix.png",
        "classification_report": "classification_report.json",
        "classification_report_markdown": "classification_report.md",
        "most_confident_errors": "most_confident_errors.png",
        "most_confident_errors_list": "most_confident_errors.json",
        "training_curves": "training_curves.png",
    }
    for name in ("confusion_matrix", "most_confident_errors", "training_curves"):
        assert is_png(tmp_path / files[name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left

    # Per-class numbers: exactly scikit-learn's.
    predictions = logits.argmax(axis=1)
    expected = classification_report(
        labels, predictions, target_names=NAMES, output_dict=True, zero_division=0
    )
    written = json.loads((tmp_path / files["classification_report"]).read_text())
    assert written.keys() == expected.keys()
    for name in [*NAMES, "macro avg", "weighted avg"]:
        assert written[name] == pytest.approx(expected[name])
    assert written["accuracy"] == pytest.approx((predictions == labels).mean())
    markdown = (tmp_path / files["classification_report_markdown"]).read_text()
    assert "| date\\|fig |" in markdown and "**macro avg**" in markdown and "**weighted avg**" in markdown

    # The grid holds misclassified rows only, most confident first, at most 16.
    errors = json.loads((tmp_path / files["most_confident_errors_list"]).read_text())
    wrong = np.flatnonzero(predictions != labels)
    assert errors["num_errors"] == len(wrong) > 0
    assert len(errors["shown"]) == min(16, len(wrong))
    probabilities = softmax(logits, axis=1)
    for shown in errors["shown"]:
        index = shown["index"]
        assert index in wrong
        assert shown["true"] == NAMES[labels[index]] and shown["predicted"] == NAMES[predictions[index]]
        assert shown["score"] == pytest.approx(probabilities[index].max())
    scores = [shown["score"] for shown in errors["shown"]]
    assert scores == sorted(scores, reverse=True)
    assert min(scores) >= np.sort(probabilities[wrong].max(axis=1))[::-1][len(scores) - 1] - 1e-12


def test_optional_reports_are_skipped(tmp_path):
    logits, labels, images = synthetic(n=12, seed=1)
    logits = np.eye(len(NAMES))[labels] * 5.0  # every prediction right
    files = write_reports(tmp_path, logits=logits, labels=labels, label_names=NAMES, images=images)
    assert set(files) == {"confusion_matrix", "classification_report", "classification_report_markdown"}
    assert not (tmp_path / "most_confident_errors.png").exists()
    assert not (tmp_path / "training_curves.png").exists()
    # A log history with no losses or eval metrics (e.g. only the run summary) gives no curves either.
    files = write_reports(
        tmp_path, logits=logits, labels=labels, label_names=NAMES, log_history=[{"train_runtime": 1.0}]
    )
    assert "training_curves" not in files


def test_without_plots_the_tables_and_error_list_are_written_and_earlier_figures_removed(tmp_path):
    logits, labels, images = synthetic()
    kwargs = dict(logits=logits, labels=labels, label_names=NAMES, images=images, log_history=LOG_HISTORY)
    drawn = write_reports(tmp_path, **kwargs)
    tables = write_reports(tmp_path, **kwargs, plots=False)
    assert tables == {
        "classification_report": "classification_report.json",
        "classification_report_markdown": "classification_report.md",
        "most_confident_errors_list": "most_confident_errors.json",
    }
    # The figures of the first call describe another model's predictions: gone, not left behind.
    assert sorted(p.name for p in tmp_path.glob("*.png")) == []
    assert set(drawn) - set(tables) == {"confusion_matrix", "most_confident_errors", "training_curves"}
    report = json.loads((tmp_path / "classification_report.json").read_text())
    expected = classification_report(
        labels, logits.argmax(axis=1), target_names=NAMES, output_dict=True, zero_division=0
    )
    assert report["macro avg"] == pytest.approx(expected["macro avg"])
    listed = json.loads((tmp_path / "most_confident_errors.json").read_text())
    assert listed["num_errors"] == int((logits.argmax(1) != labels).sum()) > 0
    assert "![" not in report_section(tables).body  # the card embeds no picture that is not there


def test_training_curves_with_partial_histories(tmp_path):
    logits, labels, _ = synthetic(n=8)
    only_train = [{"loss": 1.0 / (i + 1), "step": i} for i in range(50)]  # no epoch key: plotted by step
    files = write_reports(
        tmp_path / "a", logits=logits, labels=labels, label_names=NAMES, log_history=only_train
    )
    assert is_png(tmp_path / "a" / files["training_curves"])
    only_eval = [{"eval_accuracy": 0.5, "epoch": 1.0}, {"eval_accuracy": 0.7, "epoch": 2.0}]
    files = write_reports(
        tmp_path / "b", logits=logits, labels=labels, label_names=NAMES, log_history=only_eval
    )
    assert is_png(tmp_path / "b" / files["training_curves"])


def test_many_classes_and_other_splits(tmp_path):
    rng = np.random.default_rng(3)
    names = [f"class_{i:03d}_with_a_long_name" for i in range(100)]
    labels = rng.integers(0, 100, 300)
    logits = rng.normal(size=(300, 100))
    files = write_reports(tmp_path, logits=logits, labels=labels, label_names=names, split="validation")
    assert files["confusion_matrix"] == "validation_confusion_matrix.png"
    assert files["classification_report"] == "validation_classification_report.json"
    assert is_png(tmp_path / files["confusion_matrix"])
    assert len(json.loads((tmp_path / files["classification_report"]).read_text())) == 100 + 3


def test_mismatched_inputs_are_rejected(tmp_path):
    logits, labels, images = synthetic(n=6)
    with pytest.raises(ValueError, match="do not match"):
        write_reports(tmp_path, logits=logits, labels=labels[:5], label_names=NAMES)
    with pytest.raises(ValueError, match="images"):
        write_reports(tmp_path, logits=logits, labels=labels, label_names=NAMES, images=images[:2])


def test_report_section_of_the_model_card():
    files = {
        "confusion_matrix": "confusion_matrix.png",
        "classification_report": "classification_report.json",
        "classification_report_markdown": "classification_report.md",
        "training_curves": "training_curves.png",
    }
    section = report_section(files)
    text = section.markdown()
    assert section.title == "Evaluation reports" and text.startswith("## Evaluation reports")
    assert "![Confusion matrix](confusion_matrix.png)" in text
    assert "![Training curves](training_curves.png)" in text
    assert "(classification_report.md)" in text and "(classification_report.json)" in text
    assert "most_confident_errors" not in text
    assert report_section({}) is None
