"""Speed settings: channels-last where it helps, input-pipeline defaults chosen from the hardware."""

from __future__ import annotations

import pytest
import torch
from conftest import digits_dataset, run_training
from transformers import AutoModelForImageClassification

from hf_finetune.commands.cli import parse_train_args
from hf_finetune.errors import UserError
from hf_finetune.testing.tiny import build_tiny_checkpoint, tiny_config
from hf_finetune.train.speed import wants_channels_last


@pytest.mark.parametrize(
    ("arch", "setting", "device", "expected"),
    [
        ("resnet", "auto", "cuda", True),
        ("convnext", "auto", "cuda", True),
        ("vit", "auto", "cuda", False),  # no convolutions worth it: the patch embedding is one layer
        ("resnet", "auto", "cpu", True),  # oneDNN's NHWC convolutions (see CHANNELS_LAST_DEVICES)
        ("vit", "auto", "cpu", False),
        ("resnet", "auto", "mps", False),
        ("vit", "true", "cpu", True),
        ("resnet", "false", "cuda", False),
    ],
)
def test_channels_last_auto_is_for_convolutional_models_on_cuda_and_cpu(arch, setting, device, expected):
    model = AutoModelForImageClassification.from_config(tiny_config(arch, ["a", "b"]))
    assert wants_channels_last(model, setting, device) is expected


def test_channels_last_training_gives_the_same_result_as_contiguous(tmp_path):
    checkpoint = build_tiny_checkpoint("resnet", tmp_path / "ckpt", labels=["a", "b", "c"])
    data = digits_dataset(8)
    results = {}
    for setting in ("true", "false"):
        results[setting] = run_training(
            ["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / setting), "--max_steps", "2",
             "--use_cpu", "true", "--dataloader_num_workers", "0", "--channels_last", setting,
             "--train_val_split", "0.25", "--eval_strategy", "no", "--save_strategy", "no",
             "--load_best_model_at_end", "false"],
            dataset=data,
        )  # fmt: skip
    assert results["true"]["eval_loss"] == pytest.approx(results["false"]["eval_loss"], rel=1e-4)
    channels_last = AutoModelForImageClassification.from_pretrained(tmp_path / "true").state_dict()
    contiguous = AutoModelForImageClassification.from_pretrained(tmp_path / "false").state_dict()
    for name, tensor in contiguous.items():
        torch.testing.assert_close(channels_last[name], tensor, rtol=1e-4, atol=1e-5)


def test_input_pipeline_defaults_and_validation():
    args = parse_train_args(["--model_name_or_path", "x"])[3]
    assert args.per_device_eval_batch_size == 64
    assert args.dataloader_persistent_workers == (args.dataloader_num_workers > 0)
    no_workers = parse_train_args(["--model_name_or_path", "x", "--dataloader_num_workers", "0"])[3]
    assert no_workers.dataloader_persistent_workers is False
    with pytest.raises(UserError, match="channels_last"):
        parse_train_args(["--model_name_or_path", "x", "--channels_last", "maybe"])
