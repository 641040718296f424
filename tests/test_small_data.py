"""Small-data settings: the balanced sampler, the soup of the last checkpoints, flip test-time augmentation."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

IMBALANCED = [0] * 90 + [1] * 9 + [2]  # 100 pictures, one of class 2


# Balanced sampler --------------------------------------------------------------------------------------
def test_balanced_sampler_draws_every_class_equally_often():
    from hf_finetune.train.sampling import BalancedSampler

    sampler = BalancedSampler(IMBALANCED, seed=0)
    draws = Counter()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(IMBALANCED)  # an epoch is as long as the training split
        draws.update(IMBALANCED[i] for i in indices)
    shares = [draws[c] / 3000 for c in range(3)]
    assert all(abs(share - 1 / 3) < 0.04 for share in shares), shares  # uniform: 90 / 9 / 1 without it


def test_balanced_sampler_is_a_function_of_seed_and_epoch_only():
    from hf_finetune.train.sampling import BalancedSampler

    sampler = BalancedSampler(IMBALANCED, seed=0)
    sampler.set_epoch(1)
    epoch_1 = list(sampler)
    assert list(sampler) == epoch_1  # iterated again (a resumed epoch): the same pictures
    sampler.set_epoch(0)
    epoch_0 = list(sampler)
    torch.manual_seed(123)  # the global stream plays no part
    other = BalancedSampler(IMBALANCED, seed=0)
    other.set_epoch(1)
    assert list(other) == epoch_1 and epoch_0 != epoch_1
    reseeded = BalancedSampler(IMBALANCED, seed=1)
    reseeded.set_epoch(1)
    assert list(reseeded) != epoch_1


def test_the_trainer_draws_training_batches_from_the_balanced_sampler(tmp_path, tiny_vit):
    from conftest import FAST_RUN, digits_dataset

    from hf_finetune.commands.cli import parse_train_args
    from hf_finetune.train.run import prepare_trainer

    # 40 / 8 / 4 pictures of three digits; validation 25 % (stratified).
    data = digits_dataset(40, classes=(0, 1, 2))
    keep = [
        i for i, label in enumerate(data["label"]) if label == 0 or (label == 1 and i % 40 < 8) or i % 40 < 4
    ]
    data = data.select(keep)
    for sampler, balanced in (("random", False), ("balanced", True)):
        argv = ["--model_name_or_path", str(tiny_vit), "--output_dir", str(tmp_path / sampler), *FAST_RUN,
                "--train_val_split", "0.25", "--sampler", sampler, "--per_device_train_batch_size", "8"]  # fmt: skip
        model_args, data_args, strategy_args, training_args, *_ = parse_train_args(argv)
        trainer, prepared, _, _ = prepare_trainer(
            model_args, data_args, training_args, strategy_args, dataset=data
        )
        train_labels = prepared.splits["train"]["label"]
        drawn = Counter()
        loader = trainer.get_train_dataloader()
        for epoch in range(8):
            loader.set_epoch(epoch)  # what the Trainer does at each epoch start
            for batch in loader:
                drawn.update(batch["labels"].tolist())
        total = sum(drawn.values())
        assert total == 8 * len(train_labels)
        rare = drawn[2] / total
        if balanced:
            assert abs(rare - 1 / 3) < 0.08, drawn
        else:
            assert rare == pytest.approx(Counter(train_labels)[2] / len(train_labels)), drawn


def test_sampler_settings_are_checked():
    from hf_finetune.config import FinetuneTrainingArguments
    from hf_finetune.errors import UserError

    with pytest.raises(UserError, match="sampler='weighted'"):
        FinetuneTrainingArguments(output_dir="o", sampler="weighted")
    with pytest.raises(UserError, match="count twice over"):
        FinetuneTrainingArguments(output_dir="o", sampler="balanced", class_weights="auto")


# Soup of the last checkpoints -------------------------------------------------------------------------
def test_soup_settings_are_checked_and_keep_enough_checkpoints():
    from hf_finetune.config import FinetuneTrainingArguments
    from hf_finetune.errors import UserError

    with pytest.raises(UserError, match="save_strategy: epoch"):
        FinetuneTrainingArguments(output_dir="o", soup_last_k=3, save_strategy="steps")
    with pytest.raises(UserError, match="at least 4 epochs"):
        FinetuneTrainingArguments(output_dir="o", soup_last_k=4, save_strategy="epoch", num_train_epochs=3)
    with pytest.raises(UserError, match="whole number >= 2"):
        FinetuneTrainingArguments(output_dir="o", soup_last_k=1, save_strategy="epoch")
    args = FinetuneTrainingArguments(output_dir="o", soup_last_k=3, save_strategy="epoch", save_total_limit=2)
    assert args.save_total_limit == 4  # the best checkpoint may be kept besides the newest three


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def souped_run(tmp_path_factory, tiny_vit):
    """Three epochs, a checkpoint at each, soup_last_k 2 (in-process, tiny ViT)."""
    from conftest import digits_dataset, tiny_run

    out = tmp_path_factory.mktemp("soup") / "out"
    results = tiny_run(
        tiny_vit, out, digits_dataset(12), "--save_strategy", "epoch", "--soup_last_k", "2",
        "--train_val_split", "0.25", "--train_test_split", "0.25", epochs=3,
    )  # fmt: skip
    return out, results


def test_a_soup_run_saves_the_mean_of_the_last_checkpoints_or_the_trained_weights(souped_run):
    out, results = souped_run
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert len(steps) == 3  # save_total_limit raised to k + 1
    names = [f"checkpoint-{step}" for step in steps[1:]]
    assert results["soup_checkpoints"] == ", ".join(names)
    assert 0.0 <= results["eval_soup_accuracy"] <= 1.0
    last = [_safetensors(out / name / "model.safetensors") for name in names]
    saved = _safetensors(out / "model.safetensors")
    for key, value in saved.items():
        expected = (last[0][key] + last[1][key]) / 2 if results["soup_used"] else last[1][key]
        if value.is_floating_point():
            torch.testing.assert_close(value, expected.to(value.dtype), rtol=0, atol=1e-6)
    summary = json.loads((out / "run_summary.json").read_text())["weights_chosen"]
    assert summary["validation_accuracy"]["soup"] == results["eval_soup_accuracy"]
    assert (f"uniform soup of {', '.join(names)}" in summary["chosen"]) == results["soup_used"]
    card = (out / "README.md").read_text()
    assert "## Weights" in card and summary["chosen"] in card


@pytest.mark.parametrize("soup_scores_better", [True, False])
def test_the_soup_is_kept_only_when_it_scores_better(souped_run, soup_scores_better):
    """`choose_soup` on the run's real checkpoints, with validation scores given: the soup stays only when its
    score is higher, and it is the element-wise mean of the two checkpoints' weights."""
    from transformers import AutoModelForImageClassification

    from hf_finetune.train.averaging import choose_soup
    from hf_finetune.train.checkpoints import checkpoint_state_dict

    out, _ = souped_run
    model = AutoModelForImageClassification.from_pretrained(str(out))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([0.5, 0.7] if soup_scores_better else [0.7, 0.5])  # current, then soup
    trainer = SimpleNamespace(model=model, evaluate=lambda **_: {"eval_accuracy": next(scores)})
    result = choose_soup(trainer, out, 2, eval_dataset=None)
    assert result["soup_used"] is soup_scores_better and result["eval_soup_accuracy"] == (
        0.7 if soup_scores_better else 0.5
    )
    names = [p.name for p in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))][-2:]
    states = [checkpoint_state_dict(model, out / name) for name in names]
    for key, value in model.state_dict().items():
        expected = (states[0][key] + states[1][key]) / 2 if soup_scores_better else before[key]
        if value.is_floating_point():
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_soup_with_lora_is_refused():
    from hf_finetune.errors import UserError
    from hf_finetune.train.averaging import check_soup_strategy

    check_soup_strategy(3, "full")
    with pytest.raises(UserError, match="adapters only"):
        check_soup_strategy(3, "lora")


def test_weights_chosen_names_the_choice_with_its_figures():
    from hf_finetune.train.averaging import card_text, weights_chosen

    assert weights_chosen({"eval_accuracy": 0.9}) is None
    results = {"ema_used": True, "eval_raw_accuracy": 0.8, "eval_ema_accuracy": 0.85, "soup_used": False,
               "eval_soup_accuracy": 0.84, "soup_checkpoints": "checkpoint-4, checkpoint-6", "wise_ft_alpha": 0.75,
               "eval_wise_ft_accuracy": 0.9}  # fmt: skip
    choice = weights_chosen(results)
    assert choice["chosen"] == "WiSE-FT, 0.75 x (the EMA of the weights) + 0.25 x the LP-FT start"
    assert choice["validation_accuracy"] == {
        "trained": 0.8,
        "ema": 0.85,
        "soup": 0.84,
        "wise_ft alpha 0.75": 0.9,
    }
    assert "| soup | 0.8400 |" in card_text(choice)


# Flip test-time augmentation ---------------------------------------------------------------------------
def test_flip_tta_is_the_mean_of_the_two_predictions_and_the_model_stays_plain(tmp_path, tiny_vit):
    import numpy as np
    from conftest import digits_dataset, tiny_run
    from datasets import DatasetDict
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_finetune.data.transforms import build_transforms

    data = DatasetDict(train=digits_dataset(12), test=digits_dataset(6, offset=30))
    out = tmp_path / "out"
    results = tiny_run(tiny_vit, out, data, "--tta_flip", "true", "--train_val_split", "0.25")
    model = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    eval_tf = build_transforms(AutoImageProcessor.from_pretrained(str(out)), augment=False)[1]
    pixels = torch.stack([eval_tf(image.convert("RGB")) for image in data["test"]["image"]])
    with torch.no_grad():
        plain = model(pixel_values=pixels).logits.softmax(-1).numpy()
        mirrored = model(pixel_values=pixels.flip(-1)).logits.softmax(-1).numpy()
    labels = np.asarray(data["test"]["label"])
    assert results["test_accuracy"] == pytest.approx((plain.argmax(1) == labels).mean())
    assert results["test_accuracy_tta"] == pytest.approx(
        (((plain + mirrored) / 2).argmax(1) == labels).mean()
    )
    assert "test_macro_f1_tta" in results and "eval_accuracy_tta" not in results
    assert "tta" not in (out / "config.json").read_text()  # the saved model is the plain one


def test_flip_averaged_probabilities():
    import numpy as np

    from hf_finetune.train.tta import FlippedSplit, flip_averaged_probabilities

    logits, flipped = np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 3.0], [0.0, 1.0]])
    expected = (torch.tensor(logits).softmax(-1) + torch.tensor(flipped).softmax(-1)).numpy() / 2
    np.testing.assert_allclose(flip_averaged_probabilities(logits, flipped), expected)
    picture = torch.arange(6.0).reshape(1, 2, 3)

    class Split(list):
        def __getitems__(self, indices):
            return [self[i] for i in indices]

    flipped_split = FlippedSplit(Split([{"pixel_values": picture, "labels": 1}]))
    assert flipped_split[0]["pixel_values"][0, 0].tolist() == [2.0, 1.0, 0.0]
    assert flipped_split.__getitems__([0])[0]["labels"] == 1 and len(flipped_split) == 1
