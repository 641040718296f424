"""timm checkpoints in the Hub's timm layout, through every path: loading, labels, pixels, strategies, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import digits_dataset, run_training
from datasets import DatasetDict

from hf_finetune.args import ModelArguments
from hf_finetune.modeling import load_image_processor, load_model
from hf_finetune.tiny import build_tiny_timm_checkpoint

CHECKPOINT_LABELS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    return build_tiny_timm_checkpoint(tmp_path_factory.mktemp("timm_effnet"), CHECKPOINT_LABELS)


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    return build_tiny_timm_checkpoint(
        tmp_path_factory.mktemp("timm_vit"), CHECKPOINT_LABELS, architecture="test_vit"
    )


@pytest.fixture(scope="module")
def data():
    return DatasetDict(
        train=digits_dataset(8), validation=digits_dataset(3, offset=20), test=digits_dataset(4, offset=30)
    )


def test_fixture_has_the_hub_timm_layout(timm_checkpoint):
    from safetensors import safe_open

    config = json.loads((timm_checkpoint / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet" and config["num_classes"] == 3
    assert config["label_names"] == CHECKPOINT_LABELS
    # timm's own defaults for this architecture, untouched (only the input size is the fixture's).
    cfg = config["pretrained_cfg"]
    assert cfg["crop_pct"] == 0.95 and cfg["interpolation"] == "bicubic" and cfg["input_size"] == [3, 32, 32]
    assert not (timm_checkpoint / "preprocessor_config.json").exists()
    with safe_open(str(timm_checkpoint / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert "conv_stem.weight" in keys and "classifier.weight" in keys  # plain timm keys, no prefix


def test_transformers_still_needs_the_num_classes_workaround(timm_checkpoint):
    """When this fails, transformers loads timm's model_args with num_classes: drop_timm_num_classes_arg can go."""
    from transformers import AutoConfig, TimmWrapperForImageClassification

    config = AutoConfig.from_pretrained(timm_checkpoint)
    assert "num_classes" in config.model_args  # what timm's save_for_hf writes
    with pytest.raises(TypeError, match="multiple values for keyword argument 'num_classes'"):
        TimmWrapperForImageClassification(config)


def test_loads_as_timm_wrapper_for_a_new_label_set(timm_checkpoint, tmp_path):
    args = ModelArguments(model_name_or_path=str(timm_checkpoint))
    kept, report = load_model(args, CHECKPOINT_LABELS)
    assert type(kept).__name__ == "TimmWrapperForImageClassification" and report.kept_head
    assert type(load_image_processor(args)).__name__ == "TimmWrapperImageProcessor"

    # Same size, other order: the head is re-initialised, the backbone kept.
    reordered, report = load_model(args, ["bird", "cat", "dog"])
    assert not report.kept_head and report.reinitialised == [
        "timm_model.classifier.bias",
        "timm_model.classifier.weight",
    ]
    assert not torch.equal(kept.timm_model.classifier.weight, reordered.timm_model.classifier.weight)
    torch.testing.assert_close(kept.timm_model.conv_stem.weight, reordered.timm_model.conv_stem.weight)

    # Another size: the saved config names the new classes everywhere timm and transformers read them.
    new, report = load_model(args, ["zero", "one"])
    assert new.timm_model.classifier.out_features == 2
    new.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["label_names"] == ["zero", "one"] and saved["num_classes"] == 2
    assert "num_classes" not in saved.get("model_args", {})
    from transformers import AutoModelForImageClassification

    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert again.config.id2label == {0: "zero", 1: "one"}


def test_full_training_run_on_a_timm_checkpoint(timm_checkpoint, data, tmp_path):
    results = run_training(
        [
            "--model_name_or_path",
            str(timm_checkpoint),
            "--output_dir",
            str(tmp_path),
            "--num_train_epochs",
            "1",
        ],
        dataset=data,
    )
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["test_samples"] == 12
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (
        saved["architecture"] == "test_efficientnet"
        and saved["label_names"] == data["train"].features["label"].names
    )
