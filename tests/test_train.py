"""End to end, in-process: every supported architecture trains, evaluates and writes a loadable output."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import digits_dataset, run_training
from datasets import DatasetDict

from hf_finetune.testing.tiny import TINY_ARCHITECTURES, build_tiny_checkpoint

LABELS = ["zero", "one", "two"]


def quick_argv(checkpoint, output_dir, *extra):
    return [
        "--model_name_or_path", str(checkpoint),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--use_cpu", "true",
        "--dataloader_num_workers", "0",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def three_splits():
    return DatasetDict(
        {
            "train": digits_dataset(12, names=LABELS),
            "validation": digits_dataset(4, names=LABELS, offset=12),
            "test": digits_dataset(5, names=LABELS, offset=16),
        }
    )


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_every_architecture_trains_one_step(tmp_path, three_splits, arch):
    import torch
    from transformers import AutoModelForImageClassification, pipeline

    checkpoint = build_tiny_checkpoint(arch, tmp_path / "ckpt", labels=["a", "b", "c", "d"])
    before = AutoModelForImageClassification.from_pretrained(checkpoint).state_dict()
    results = run_training(
        quick_argv(checkpoint, tmp_path / "out", "--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
                   "--load_best_model_at_end", "false"),
        dataset=three_splits,
    )  # fmt: skip
    assert results["test_samples"] == 15
    # The reported test accuracy is that of the saved model as pipeline() runs it (one tie may flip).
    classify = pipeline("image-classification", model=str(tmp_path / "out"), device="cpu")
    test = three_splits["test"]
    hits = [
        classify(image, top_k=1)[0]["label"] == LABELS[y]
        for image, y in zip(test["image"], test["label"], strict=True)
    ]
    assert abs(sum(hits) / len(hits) - results["test_accuracy"]) <= 1 / len(hits) + 1e-9
    after = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert after.config.id2label == dict(enumerate(LABELS))
    changed = [
        name for name, t in after.state_dict().items() if name in before and not torch.equal(t, before[name])
    ]
    assert any(not name.startswith("classifier") for name in changed), "one step should move the backbone too"


def test_output_directory_is_complete_and_pipeline_predicts_label_names(tmp_path, three_splits, tiny_vit):
    from transformers import pipeline

    out = tmp_path / "out"
    results = run_training(quick_argv(tiny_vit, out, "--num_train_epochs", "2"), dataset=three_splits)
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "all_results.json",
        "resolved_config.yaml",
        "README.md",
        "data_splits.json",
        "run_summary.json",
    ):
        assert (out / name).is_file(), name
    all_results = json.loads((out / "all_results.json").read_text())
    for key in ("train_loss", "eval_accuracy", "eval_macro_f1", "test_accuracy", "test_macro_f1"):
        assert key in all_results, key
    assert all_results["test_accuracy"] == results["test_accuracy"]
    assert "top5_accuracy" not in " ".join(all_results)  # three classes: top-5 would always be 1
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["num_train_epochs"] == 2
    # Written relative to the working directory: no absolute local path in a file that may be published.
    assert not os.path.isabs(resolved["model_name_or_path"])
    assert os.path.abspath(resolved["model_name_or_path"]) == str(tiny_vit)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["checkpoint_head"] == "re-initialised"
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "`zero`" in card and str(tmp_path) not in card

    classifier = pipeline("image-classification", model=str(out), device="cpu")
    predictions = classifier(three_splits["test"]["image"][:4], top_k=3)
    assert {p["label"] for p in predictions[0]} == set(LABELS)


def test_bad_images_are_skipped_and_listed(tmp_path, small_digits_folder, tiny_vit):
    import shutil

    folder = tmp_path / "pics"
    shutil.copytree(small_digits_folder, folder)
    (folder / "one" / "corrupt.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    run_training(quick_argv(tiny_vit, out, "--train_dir", str(folder), "--max_steps", "1", "--eval_strategy", "no",
                            "--save_strategy", "no", "--load_best_model_at_end", "false"))  # fmt: skip
    bad = json.loads((out / "bad_images.json").read_text())
    assert [b["image"].rsplit("/", 1)[-1] for b in bad] == ["corrupt.png"]
    assert json.loads((out / "run_summary.json").read_text())["bad_images_skipped"] == 1


def test_training_improves_over_chance(tmp_path, tiny_vit):
    data = DatasetDict(
        {"train": digits_dataset(40, names=LABELS), "test": digits_dataset(15, names=LABELS, offset=40)}
    )
    results = run_training(
        quick_argv(tiny_vit, tmp_path / "out", "--num_train_epochs", "12", "--learning_rate", "0.003",
                   "--random_resized_crop_scale", "0.7", "1.0", "--horizontal_flip", "false", "--train_val_split", "0.2"),
        dataset=data,
    )  # fmt: skip
    assert results["test_accuracy"] >= 0.6  # chance is 0.33


def test_model_card_metadata_parses_with_huggingface_hub(tmp_path, three_splits, tiny_vit):
    # ModelCard.validate() asks the Hub's server; offline, parse it with huggingface_hub's own readers, which
    # reject a malformed model-index.
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    out = tmp_path / "out"
    results = run_training(
        quick_argv("google/vit-base-patch16-224-in21k", out, "--max_steps", "1", "--license", "apache-2.0",
                   "--hub_model_id", "me/digits", "--eval_strategy", "no", "--save_strategy", "no",
                   "--load_best_model_at_end", "false", "--model_name_or_path", str(tiny_vit)),
        dataset=three_splits,
    )  # fmt: skip
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-classification" and data["license"] == "apache-2.0"
    assert "image-classification" in data["tags"] and data["library_name"] == "transformers"
    name, eval_results = model_index_to_eval_results(data["model-index"])
    assert name == "me/digits"
    accuracy = next(r for r in eval_results if r.metric_type == "accuracy")
    assert (
        accuracy.metric_value == pytest.approx(results["test_accuracy"]) and accuracy.dataset_split == "test"
    )
    assert 'model="me/digits"' in card.text  # the usage snippet names the repository it will live in
    assert "confusion_matrix.png" in card.text and "classification_report.md" in card.text


def test_early_stopping_stops_when_validation_stops_improving(tmp_path, three_splits, tiny_vit):
    # A learning rate of zero never improves the validation accuracy: patience 1 stops after the second epoch.
    run_training(
        quick_argv(tiny_vit, tmp_path / "out", "--num_train_epochs", "6", "--learning_rate", "0",
                   "--early_stopping_patience", "1"),
        dataset=three_splits,
    )  # fmt: skip
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0
