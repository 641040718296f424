"""Multi-label classification: detection and encoding of label sets, iterative stratification, the BCE loss,
thresholds chosen on validation and saved, every strategy end to end on mosaics of real digit scans,
pipeline() scores and predict's output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run

from hf_finetune.config import DataArguments
from hf_finetune.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIGITS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory) -> Path:
    from hf_finetune.testing.mosaics import build_digit_mosaics

    return build_digit_mosaics(tmp_path_factory.mktemp("mosaics"), num_images=80, digits=DIGITS)


def _prepare(tmp_path, rows, suffix=".csv", **settings):
    from PIL import Image

    from hf_finetune.data.prepare import prepare_data

    for i in range(len(rows)):
        Image.new("RGB", (16, 16), (i * 7 % 255, 80, 160)).save(tmp_path / f"{i}.png")
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_text("image,labels\n" + "".join(f"{i}.png,{v}\n" for i, v in enumerate(rows)))
    else:
        path.write_text(
            "".join(json.dumps({"image": f"{i}.png", "labels": v}) + "\n" for i, v in enumerate(rows))
        )
    return prepare_data(DataArguments(train_file=str(path), train_val_split=0.25, **settings), seed=0)


def test_mosaics_are_deterministic_label_sets(tmp_path, mosaics):
    from hf_finetune.testing.mosaics import build_digit_mosaics

    again = build_digit_mosaics(tmp_path, num_images=80, digits=DIGITS)
    assert again.read_text() == mosaics.read_text()
    labels = [line.split(",")[1].split(";") for line in mosaics.read_text().splitlines()[1:]]
    assert {len(set(row)) for row in labels} == {2, 3}
    assert {d for row in labels for d in row} == {str(d) for d in DIGITS}


def test_separator_column_is_detected_and_encoded_in_one_label_set(tmp_path, caplog):
    from datasets import ClassLabel

    rows = ["10;2", "2", "2;10", "3;10", "3", "2;3", "10", "3;2;10"]
    with caplog.at_level(logging.INFO):
        data = _prepare(tmp_path, rows)
    assert data.multi_label and data.labels == ["2", "3", "10"]  # class ids in numeric order
    assert "label_separator" in caplog.text
    for split in data.splits.values():
        assert isinstance(split.features["labels"].feature, ClassLabel)
    every = {tuple(sorted(data.labels[i] for i in ids)) for s in data.splits.values() for ids in s["labels"]}
    assert ("10", "2") in every and ("10", "2", "3") in every


def test_json_lists_and_empty_lists(tmp_path, caplog):
    rows = [["cat", "dog"], ["dog"], [], ["cat"], ["dog", "cat"], ["cat"], ["dog"], []]
    with caplog.at_level(logging.INFO):
        data = _prepare(tmp_path, rows, suffix=".jsonl")
    assert data.multi_label and data.labels == ["cat", "dog"]
    sizes = sum(len(ids) == 0 for s in data.splits.values() for ids in s["labels"])
    assert sizes == 2 and "empty label list" in caplog.text


def test_hub_style_sequence_of_classlabel_in_memory():
    from datasets import ClassLabel, Dataset, Features, Image, Sequence
    from PIL import Image as PILImage

    from hf_finetune.data.prepare import prepare_data

    features = Features({"image": Image(), "tags": Sequence(ClassLabel(names=["b", "a", "c"]))})
    pictures = [PILImage.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(12)]
    tags = [[0, 1], [2], [1], [0], [1, 2], [0, 2]] * 2
    dataset = Dataset.from_dict({"image": pictures, "tags": tags}, features=features)
    data = prepare_data(DataArguments(train_val_split=0.34), seed=0, dataset=dataset)
    assert data.multi_label and data.label_column == "tags"
    assert data.labels == ["a", "b", "c"]  # names sorted, ids re-mapped: b (0) -> 1
    original = sorted(tuple(sorted(["b", "a", "c"][i] for i in row)) for row in tags)
    encoded = sorted(
        tuple(sorted(data.labels[i] for i in row)) for s in data.splits.values() for row in s["tags"]
    )
    assert encoded == original


@pytest.mark.parametrize(
    "rows, suffix, settings, message",
    [
        (["a;b", "", "a", "b"] * 2, ".csv", {}, "have no value in label column"),
        ([["a"], ["b"], ["a", "b"], None] * 2, ".jsonl", {}, "have no value in label column"),
        ([["a", "b"], ["a"]] * 4, ".jsonl", {"task": "single_label"}, "holds lists of labels"),
        (["a"] * 8, ".csv", {"task": "multi_label"}, "needs at least two"),
    ],
)
def test_bad_multi_label_input_is_one_clear_error(tmp_path, rows, suffix, settings, message):
    with pytest.raises(UserError, match=message):
        _prepare(tmp_path, rows, suffix=suffix, **settings)


def test_label_only_in_validation_is_an_error(tmp_path):
    from PIL import Image

    from hf_finetune.data.prepare import prepare_data

    for i in range(6):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "train.csv").write_text("image,labels\n0.png,a;b\n1.png,a\n2.png,b\n3.png,a;b\n")
    (tmp_path / "val.csv").write_text("image,labels\n4.png,a;c\n5.png,b\n")
    args = DataArguments(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "val.csv"))
    with pytest.raises(UserError, match=r"\['c'\] appear in the validation split but in no training"):
        prepare_data(args, seed=0)


def test_iterative_stratification_puts_every_label_in_every_fold():
    from hf_finetune.data.splits import iterative_stratification

    rng = np.random.default_rng(0)
    labels = (rng.random((200, 12)) < np.linspace(0.03, 0.5, 12)).astype(int)
    labels[:4, 0] = 1  # the rarest label: a handful of rows
    fold = iterative_stratification(labels, [0.7, 0.15, 0.15], seed=0)
    assert set(fold) == {0, 1, 2}
    for f in range(3):
        assert (labels[fold == f].sum(0) > 0).all(), f"fold {f} misses a label"
    assert abs((fold == 0).mean() - 0.7) < 0.03
    # Each fold holds close to its share of every label's positives (within a tenth of them, plus one).
    positives = labels.sum(0)
    for f, share in enumerate([0.7, 0.15, 0.15]):
        assert (np.abs(labels[fold == f].sum(0) - share * positives) <= 0.1 * positives + 1).all()


def test_carved_splits_hold_every_label_and_log_when_they_cannot(tmp_path, caplog, mosaics):
    from hf_finetune.data.multilabel import label_matrix
    from hf_finetune.data.prepare import prepare_data

    data = prepare_data(DataArguments(train_file=str(mosaics), train_test_split=0.2), seed=0)
    assert set(data.splits) == {"train", "validation", "test"}
    for split in data.splits.values():
        assert (label_matrix(split["labels"], len(DIGITS)).sum(0) > 0).all()
    assert data.report["validation"]["stratified"] == "iterative"
    # A label on one picture cannot reach every split: the log says so.
    with caplog.at_level(logging.WARNING):
        _prepare(tmp_path, ["a;b", "a", "b", "a;b", "a", "b", "b;c", "a"])
    assert "could not give the" in caplog.text and "c" in caplog.text


def test_multi_label_loss_is_mean_bce_and_mixup_mixes_multi_hot_rows():
    import torch

    from hf_finetune.train.losses import MultiLabelLoss
    from hf_finetune.train.mixing import BatchMixing, MixingSettings

    logits = torch.randn(4, 3)
    targets = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    loss = MultiLabelLoss()
    assert torch.allclose(loss({"logits": logits}, targets), expected)
    # Two accumulated micro-batches, normalised by the Trainer's count of every target element.
    halves = [loss({"logits": logits[i : i + 2]}, targets[i : i + 2], num_items_in_batch=12) for i in (0, 2)]
    assert torch.allclose(sum(halves), expected)
    smoothed = MultiLabelLoss(0.2)({"logits": logits}, targets)
    assert torch.allclose(
        smoothed, torch.nn.functional.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.1)
    )
    mixing = BatchMixing(MixingSettings(0.4, 0.0, 1.0, 0.5), 3)
    torch.manual_seed(0)
    out = mixing({"pixel_values": torch.rand(4, 3, 8, 8), "labels": targets})
    rolled = targets.roll(1, 0)
    lam = out["labels"][0, 0]  # targets[0, 0] is 1, rolled[0, 0] is 0
    assert torch.allclose(out["labels"], lam * targets + (1 - lam) * rolled, atol=1e-6)
    assert 0 < lam < 1


def test_thresholds_maximise_each_labels_f1():
    from sklearn.metrics import f1_score

    from hf_finetune.train.multilabel import choose_thresholds, sigmoid

    rng = np.random.default_rng(0)
    targets = (rng.random((60, 3)) < 0.4).astype(int)
    logits = targets * 1.5 - 2.0 + rng.normal(0, 0.8, (60, 3))  # positives score low: 0.5 is a poor cut
    thresholds = choose_thresholds(logits, targets)
    scores = sigmoid(logits)
    for j in range(3):
        best = f1_score(targets[:, j], scores[:, j] >= thresholds[j])
        assert best >= f1_score(targets[:, j], scores[:, j] >= 0.5)
        assert all(best >= f1_score(targets[:, j], scores[:, j] >= t) - 1e-12 for t in scores[:, j])


def test_per_label_report_without_plots_removes_the_ap_plot_of_an_earlier_run(tmp_path):
    from hf_finetune.outputs.multilabel import write_multi_label_reports

    rng = np.random.default_rng(1)
    targets = (rng.random((30, 3)) < 0.5).astype(int)
    logits = targets * 2.0 - 1.0 + rng.normal(0, 0.5, (30, 3))
    arguments = (tmp_path, logits, targets, ["a", "b", "c"], [0.5, 0.5, 0.5], "test")
    assert "per_label_ap" in write_multi_label_reports(*arguments)
    assert (tmp_path / "per_label_ap_test.png").is_file()
    files = write_multi_label_reports(*arguments, plots=False)
    assert files == {
        "per_label_report": "per_label_report_test.json",
        "per_label_report_markdown": "per_label_report_test.md",
    }
    assert not (tmp_path / "per_label_ap_test.png").exists()
    rows = json.loads((tmp_path / files["per_label_report"]).read_text())["labels"]
    assert [row["support"] for row in rows] == targets.sum(axis=0).tolist()


def _run(checkpoint, output_dir, mosaics, *flags, epochs=2):
    return tiny_run(
        checkpoint, output_dir, None, "--train_file", str(mosaics), "--train_test_split", "0.2", *flags,
        epochs=epochs,
    )  # fmt: skip


def test_full_run_saves_thresholds_metrics_card_and_pipeline_gives_sigmoid_scores(
    tmp_path, checkpoints, mosaics
):
    import torch
    from transformers import AutoModelForImageClassification, pipeline

    from hf_finetune.data.prepare import prepare_data
    from hf_finetune.train.multilabel import multi_label_metrics

    out = tmp_path / "run"
    results = _run(checkpoints("vit"), out, mosaics, "--learning_rate", "0.003", epochs=3)
    saved = json.loads((out / "all_results.json").read_text())
    for key in (
        "test_mAP",
        "test_micro_f1",
        "test_macro_f1",
        "test_subset_accuracy",
        "test_macro_f1_at_thresholds",
    ):
        assert key in saved and 0.0 <= saved[key] <= 1.0
    assert "test_accuracy" not in saved
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    thresholds = config["multi_label_thresholds"]
    assert len(thresholds) == len(DIGITS) and all(0 < t < 1 for t in thresholds)
    assert "calibration_temperature" not in config
    report = json.loads((out / "per_label_report_test.json").read_text())
    assert [row["threshold"] for row in report["labels"]] == [round(t, 4) for t in thresholds]
    assert (out / "per_label_ap_test.png").stat().st_size > 1000

    # The saved thresholds are the ones the test metrics were measured at.
    test = prepare_data(DataArguments(train_file=str(mosaics), train_test_split=0.2), seed=42).splits["test"]
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    classifier = pipeline("image-classification", model=str(out))
    images = [Path(mosaics).parent / p["path"] if isinstance(p, dict) else p for p in test["image"]]
    scores = classifier(images, top_k=len(DIGITS))
    first = {row["label"]: row["score"] for row in scores[0]}
    pixels = classifier.image_processor(images[0], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.sigmoid(model(pixel_values=pixels).logits)[0]
    assert np.allclose(
        [first[model.config.id2label[i]] for i in range(len(DIGITS))], expected.numpy(), atol=1e-5
    )
    assert abs(sum(first.values()) - 1.0) > 1e-3  # independent sigmoids, not a softmax
    logits = np.log([[s[model.config.id2label[i]] for i in range(4)] for s in
                     ({r["label"]: r["score"] for r in row} for row in scores)])  # fmt: skip
    logits = logits - np.log1p(-np.exp(logits))
    targets = np.array([[float(i in ids) for i in range(4)] for ids in test["labels"]])
    recomputed = multi_label_metrics(logits, targets, thresholds)
    assert recomputed["macro_f1_at_thresholds"] == pytest.approx(
        results["test_macro_f1_at_thresholds"], abs=1e-6
    )
    assert recomputed["mAP"] == pytest.approx(results["test_mAP"], abs=1e-6)

    card = (out / "README.md").read_text()
    assert "Multi-label thresholds" in card and "multi_label_thresholds" in card
    assert "name: mAP" in card and "macro_f1_at_thresholds" in card


def test_predict_applies_the_saved_thresholds(tmp_path, checkpoints, mosaics, capsys):
    from hf_finetune.commands.predict import main, predict_paths
    from hf_finetune.outputs.multilabel import save_thresholds

    out = tmp_path / "run"
    _run(checkpoints("vit"), out, mosaics, epochs=1)
    picture = str(Path(mosaics).parent / "images" / "mosaic_0000.png")
    everything = predict_paths(out, [picture], top_k=10)[0]
    assert 0 < len(everything["labels"]) <= len(DIGITS) or everything["labels"] == []
    save_thresholds(out, [0.0, 1.1, 0.0, 1.1])  # labels 0 and 2 always pass, 1 and 3 never
    row = predict_paths(out, [picture])[0]
    assert sorted(row["labels"]) == ["0", "2"] and all(0 < s < 1 for s in row["scores"])
    main([str(out), picture])
    printed = capsys.readouterr().out
    assert "mosaic_0000.png" in printed and "0 (" in printed and "1 (" not in printed
    save_thresholds(out, [1.1] * 4)
    main([str(out), picture])
    assert "no label reaches its threshold" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["head", "last_n", "gradual", "llrd", "lora"])
def test_every_gradient_strategy_trains_multi_label(tmp_path, checkpoints, mosaics, strategy):
    out = tmp_path / strategy
    results = _run(checkpoints("vit"), out, mosaics, "--strategy", strategy, epochs=1)
    assert 0.0 <= results["test_mAP"] <= 1.0
    assert len(json.loads((out / "config.json").read_text())["multi_label_thresholds"]) == len(DIGITS)


def test_settings_that_do_not_apply_to_multi_label_are_refused(tmp_path, checkpoints, mosaics):
    with pytest.raises(UserError, match="class_weights: none"):
        _run(checkpoints("vit"), tmp_path / "a", mosaics, "--class_weights", "auto", epochs=1)
    with pytest.raises(UserError, match="CutMix"):
        _run(checkpoints("vit"), tmp_path / "b", mosaics, "--cutmix_alpha", "1.0", epochs=1)


def test_best_checkpoint_and_ema_are_chosen_on_validation_map(tmp_path, checkpoints, mosaics):
    out = tmp_path / "run"
    results = _run(
        checkpoints("vit"), out, mosaics, "--eval_strategy", "epoch", "--save_strategy", "epoch",
        "--load_best_model_at_end", "true", "--ema", "true", epochs=2,
    )  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_metric"] is not None and "eval_mAP" in state["log_history"][0]
    assert {"eval_ema_mAP", "eval_raw_mAP", "ema_used"} <= set(results)
