"""The loss, MixUp / CutMix, the weight average and weight interpolation, on numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_finetune.train.averaging import choose_interpolation, interpolate, uniform_soup
from hf_finetune.train.losses import ClassificationLoss, inverse_frequency_weights
from hf_finetune.train.mixing import BatchMixing, MixingSettings

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0], [-2.0, 4.0, 0.0]])
LABELS = torch.tensor([0, 2, 1, 1])


def test_hard_labels_match_torch_cross_entropy_with_smoothing():
    for smoothing in (0.0, 0.1):
        ours = ClassificationLoss(label_smoothing=smoothing)({"logits": LOGITS}, LABELS)
        expected = F.cross_entropy(LOGITS, LABELS, label_smoothing=smoothing)
        assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_one_hot_targets_give_the_hard_loss():
    soft = F.one_hot(LABELS, 3).float()
    loss = ClassificationLoss()
    assert loss({"logits": LOGITS}, soft).item() == pytest.approx(loss({"logits": LOGITS}, LABELS).item())


def test_accumulated_micro_batches_add_up_to_the_whole_batch():
    """The Trainer sums micro-batch losses over an optimizer step, passing the step's label count."""
    loss = ClassificationLoss(label_smoothing=0.1)
    whole = loss({"logits": LOGITS}, LABELS)
    halves = sum(loss({"logits": LOGITS[i : i + 2]}, LABELS[i : i + 2], num_items_in_batch=4) for i in (0, 2))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)
    # Soft targets: the Trainer counts pictures x classes (labels != -100 on a 4 x 3 tensor is 12).
    soft = F.one_hot(LABELS, 3).float()
    soft_halves = sum(
        loss({"logits": LOGITS[i : i + 2]}, soft[i : i + 2], num_items_in_batch=12) for i in (0, 2)
    )
    assert soft_halves.item() == pytest.approx(whole.item(), rel=1e-6)


def test_class_weights_weigh_each_picture_by_its_class():
    weights = [1.0, 3.0, 0.5]
    ours = ClassificationLoss(class_weights=weights)({"logits": LOGITS}, LABELS, num_items_in_batch=4)
    per_picture = F.cross_entropy(LOGITS, LABELS, reduction="none")
    expected = sum(weights[int(c)] * v for c, v in zip(LABELS, per_picture, strict=True)) / 4
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


def test_inverse_frequency_weights():
    # 6 pictures, 3 classes: counts 3, 2, 1 -> 6 / (3 * n_c); a class absent from train gets 0 and is not counted.
    assert inverse_frequency_weights([0, 0, 0, 1, 1, 2], 3) == pytest.approx([2 / 3, 1.0, 2.0])
    assert inverse_frequency_weights([0, 1, 0, 1], 3) == [1.0, 1.0, 0.0]
    assert inverse_frequency_weights([0, 1, 2], 3) == [1.0, 1.0, 1.0]


def _batch(n=8, classes=4):
    torch.manual_seed(0)
    return {"pixel_values": torch.rand(n, 3, 16, 16), "labels": torch.arange(n) % classes}


def test_mixup_blends_pictures_and_labels_with_one_weight():
    batch = _batch()
    torch.manual_seed(123)
    out = BatchMixing(MixingSettings(mixup_alpha=0.8), num_labels=4)(batch)
    assert out["labels"].shape == (8, 4) and out["labels"].dtype == torch.float32
    assert torch.allclose(out["labels"].sum(1), torch.ones(8))
    # v2.MixUp pairs each picture with the batch rolled by one: x' = lam x + (1 - lam) roll(x).
    lam = out["labels"][0, 0].item()  # picture 0 is class 0, its partner (picture 7) class 3
    expected = lam * batch["pixel_values"] + (1 - lam) * batch["pixel_values"].roll(1, 0)
    assert torch.allclose(out["pixel_values"], expected, atol=1e-6)


def test_cutmix_labels_are_the_pasted_area():
    batch = _batch()
    torch.manual_seed(5)
    out = BatchMixing(MixingSettings(cutmix_alpha=1.0), num_labels=4)(batch)
    changed = (out["pixel_values"][0] != batch["pixel_values"][0]).any(0).float().mean().item()
    # Picture 0 (class 0) keeps 1 - area of itself; its partner's class (3) gets the pasted area.
    assert out["labels"][0, 3].item() == pytest.approx(changed, abs=1e-6)
    assert out["labels"][0, 0].item() == pytest.approx(1 - changed, abs=1e-6)


def test_mixing_is_a_function_of_the_generator_state():
    """Resume exactness rests on this: the same seed before the step gives the same mix."""
    mixing = BatchMixing(MixingSettings(mixup_alpha=0.8, cutmix_alpha=1.0), num_labels=4)
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        outs.append(mixing(_batch()))
    assert torch.equal(outs[0]["pixel_values"], outs[1]["pixel_values"])
    assert torch.equal(outs[0]["labels"], outs[1]["labels"])


def test_unmixed_batches_still_get_soft_targets_and_off_is_a_no_op():
    batch = _batch()
    out = BatchMixing(MixingSettings(mixup_alpha=0.8, mix_prob=0.0), num_labels=4)(batch)
    assert torch.equal(out["pixel_values"], batch["pixel_values"])
    assert torch.equal(out["labels"], F.one_hot(batch["labels"], 4).float())
    assert BatchMixing(MixingSettings(), num_labels=4)(batch) is batch
    from hf_finetune.config import FinetuneTrainingArguments
    from hf_finetune.errors import UserError

    with pytest.raises(UserError, match="mixup_alpha=-1"):
        FinetuneTrainingArguments(output_dir="out", mixup_alpha=-1, use_cpu=True)
    with pytest.raises(UserError, match="mix_prob=1.5"):
        FinetuneTrainingArguments(output_dir="out", mix_prob=1.5, use_cpu=True)


def _states():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(7)}
    return a, b


def test_uniform_soup_means_floats_and_keeps_the_last_count():
    a, b = _states()
    soup = uniform_soup([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0]))
    assert soup["n"].item() == 7
    with pytest.raises(ValueError, match="other keys"):
        uniform_soup([a, {"w": a["w"]}])


def test_interpolation_and_alpha_chosen_by_the_score():
    a, b = _states()
    assert torch.equal(interpolate(a, b, 0.25)["w"], torch.tensor([1.0, 3.0]))
    # A score that peaks at w[0] == 3 (alpha 0.75).
    alpha, state, scores = choose_interpolation(a, b, lambda s: -abs(s["w"][0].item() - 3.0))
    assert alpha == 0.75 and torch.equal(state["w"], torch.tensor([3.0, 5.0]))
    assert set(scores) == {0.0, 0.25, 0.5, 0.75, 1.0} and math.isclose(scores[1.0], -1.0)


def test_ema_follows_timm_decay_saves_into_checkpoints_and_resumes(tmp_path):
    from types import SimpleNamespace

    from hf_finetune.train.ema import EMA_WEIGHTS, EmaCallback

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback = EmaCallback(decay=0.9, warmup=False)
    callback.on_train_begin(args, None, None, model=model)
    expected = {k: v.clone() for k, v in start.items()}
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        callback.on_step_end(args, SimpleNamespace(global_step=step), None, model=model)
        # timm skips the decay on the first step (the average starts as a copy): decay 0 at step 1.
        decay = 0.0 if step == 1 else 0.9
        expected = {k: decay * expected[k] + (1 - decay) * v for k, v in model.state_dict().items()}
    for key, value in callback.ema.module.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6)
    (tmp_path / "checkpoint-3").mkdir()  # on_save follows the Trainer's own save into this folder
    callback.on_save(args, SimpleNamespace(global_step=3, is_world_process_zero=True), None)
    assert (tmp_path / "checkpoint-3" / EMA_WEIGHTS).is_file()

    resumed = EmaCallback(decay=0.9, warmup=False, resume_from=str(tmp_path / "checkpoint-3"))
    resumed.on_train_begin(args, None, None, model=torch.nn.Linear(3, 2))
    for key, value in resumed.ema.module.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6)
    with pytest.raises(FileNotFoundError, match="without ema"):
        EmaCallback(resume_from=str(tmp_path)).on_train_begin(args, None, None, model=model)


# Augmentation policies ----------------------------------------------------------------------------------
def _chelsea():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())


def test_randaugment_and_erasing_change_training_pixels_only_and_are_seeded():
    from transformers import ViTImageProcessor

    from hf_finetune.data.transforms import SeededAugmentation, build_transforms

    processor = ViTImageProcessor(size={"height": 64, "width": 64})
    plain, eval_plain = build_transforms(processor, crop_scale=(1.0, 1.0), horizontal_flip=False)
    policy, eval_policy = build_transforms(
        processor,
        crop_scale=(1.0, 1.0),
        horizontal_flip=False,
        auto_augment="randaugment",
        random_erasing=1.0,
    )
    image = _chelsea()
    assert torch.equal(eval_plain(image), eval_policy(image))  # evaluation never augments
    base = SeededAugmentation(plain, seed=0)(image, epoch=0, index=3)
    first = SeededAugmentation(policy, seed=0)(image, epoch=0, index=3)
    again = SeededAugmentation(policy, seed=0)(image, epoch=0, index=3)
    assert torch.equal(first, again) and first.shape == base.shape == (3, 64, 64)
    # Erasing with probability 1 sets one box to 0 (the normalised mean) in every channel.
    erased = (first == 0).all(0)
    assert erased.float().mean() > 0.01 and not (base == 0).all(0).any()
    trivial, _ = build_transforms(
        processor, crop_scale=(1.0, 1.0), horizontal_flip=False, auto_augment="trivialaugment"
    )
    draws = {SeededAugmentation(trivial, seed=0)(image, epoch=0, index=i).sum().item() for i in range(6)}
    assert len(draws) > 1  # another operation (or strength) per picture


def test_bad_augmentation_settings_are_user_errors():
    from hf_finetune.config import DataArguments
    from hf_finetune.errors import UserError

    with pytest.raises(UserError, match="auto_augment='autoaugment'"):
        DataArguments(train_dir="x", auto_augment="autoaugment")
    with pytest.raises(UserError, match="random_erasing=1.5"):
        DataArguments(train_dir="x", random_erasing=1.5)


# Stochastic depth ---------------------------------------------------------------------------------------
def _drop_probabilities(model) -> list[float]:
    rates = []
    for module in model.modules():
        for attr in ("drop_prob", "drop_rate"):
            value = getattr(module, attr, None)
            if "DropPath" in type(module).__name__ and isinstance(value, float):
                rates.append(value)
    return rates


def test_drop_path_rate_reaches_transformers_and_timm_models(tmp_path):
    from hf_finetune.config import ModelArguments
    from hf_finetune.errors import UserError
    from hf_finetune.models.loading import load_model
    from hf_finetune.testing.tiny import build_tiny_checkpoint, build_tiny_timm_checkpoint

    labels = ["a", "b"]
    convnext = build_tiny_checkpoint("convnext", tmp_path / "convnext", ["x", "y", "z"])
    model, _ = load_model(ModelArguments(model_name_or_path=str(convnext), drop_path_rate=0.2), labels)
    assert model.config.drop_path_rate == 0.2
    assert max(_drop_probabilities(model)) == pytest.approx(0.2)  # linear in depth, 0.2 in the last block
    plain, _ = load_model(ModelArguments(model_name_or_path=str(convnext)), labels)
    assert max(_drop_probabilities(plain), default=0.0) == 0.0

    timm_folder = build_tiny_timm_checkpoint(tmp_path / "timm", ["x", "y", "z"])
    timm_model, _ = load_model(
        ModelArguments(model_name_or_path=str(timm_folder), drop_path_rate=0.3), labels
    )
    assert timm_model.config.model_args["drop_path_rate"] == 0.3
    assert max(_drop_probabilities(timm_model)) > 0.0

    vit = build_tiny_checkpoint("vit", tmp_path / "vit", ["x", "y", "z"])
    with pytest.raises(UserError, match="no stochastic depth"):
        load_model(ModelArguments(model_name_or_path=str(vit), drop_path_rate=0.1), labels)


# LP-FT -------------------------------------------------------------------------------------------------
def test_lp_ft_head_reproduces_the_probe_on_validation(tmp_path, small_digits_folder, tiny_vit, monkeypatch):
    """The head LP-FT starts from is the fitted probe: its predictions on validation are the probe's."""
    import numpy as np

    from hf_finetune.commands.cli import parse_train_args
    from hf_finetune.data.prepare import prepare_data
    from hf_finetune.data.transforms import build_transforms
    from hf_finetune.models.loading import load_image_processor, load_model
    from hf_finetune.probe.arguments import ProbeRunArguments
    from hf_finetune.probe.run import fit_probe
    from hf_finetune.strategies.lp_ft import initialise_head_from_probe

    argv = [
        "--model_name_or_path", str(tiny_vit), "--train_dir", str(small_digits_folder), "--strategy", "lp_ft",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    monkeypatch.setenv("HF_FINETUNE_FEATURES_CACHE", str(tmp_path / "features"))
    parsed = {type(p).__name__: p for p in parse_train_args(argv)}
    model_args, data_args, training_args = (
        parsed["ModelArguments"], parsed["DataArguments"], parsed["FinetuneTrainingArguments"],
    )  # fmt: skip
    data = prepare_data(data_args, training_args.seed)
    model, _ = load_model(model_args, data.labels)
    summary = initialise_head_from_probe(model, data, model_args, data_args, training_args)
    assert 0.0 < summary["probe_eval_accuracy"] <= 1.0 and "C" in summary["probe_hyperparameters"]

    probe = fit_probe(model_args, data_args, ProbeRunArguments(), training_args)
    eval_tf = build_transforms(load_image_processor(model_args), augment=False)[1]
    validation = data.splits["validation"]
    pixels = torch.stack([eval_tf(image.convert("RGB")) for image in validation[data.image_column]])
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits.numpy()
    np.testing.assert_array_equal(logits.argmax(1), probe.predictions("validation"))
    agreement = (logits.argmax(1) == np.asarray(validation[data.label_column])).mean()
    assert agreement == pytest.approx(summary["probe_eval_accuracy"])


def test_lp_ft_and_the_probe_share_the_feature_cache_dir_they_are_given(tmp_path, tiny_vit, monkeypatch):
    """`--feature_cache_dir` is a setting of lp_ft as of the probe: LP-FT's probe caches its features there (not
    in $HF_FINETUNE_FEATURES_CACHE), and a probe run on the same checkpoint and data reads them back."""
    import json

    from conftest import digits_dataset, tiny_run

    from hf_finetune.outputs.files import RUN_SUMMARY

    default, given = tmp_path / "default-cache", tmp_path / "given-cache"
    monkeypatch.setenv("HF_FINETUNE_FEATURES_CACHE", str(default))
    data = digits_dataset(n_per_class=8)
    flags = ("--feature_cache_dir", str(given), "--train_val_split", "0.25")
    tiny_run(tiny_vit, tmp_path / "lp_ft", data, "--strategy", "lp_ft", *flags)
    assert "lp_ft_probe" in json.loads((tmp_path / "lp_ft" / RUN_SUMMARY).read_text())
    entries = sorted(p.parent for p in given.rglob("features.npy"))
    assert len(entries) == 2 and not default.exists()  # train and validation, in the folder given
    tiny_run(tiny_vit, tmp_path / "probe", data, "--strategy", "probe", *flags)
    probe = json.loads((tmp_path / "probe" / "all_results.json").read_text())
    assert (probe["feature_cache_hits"], probe["feature_cache_misses"], probe["backbone_forward_passes"]) == (
        2,
        0,
        0,
    )
    assert sorted(p.parent for p in given.rglob("features.npy")) == entries


# A run with every setting on ---------------------------------------------------------------------------
def test_a_run_with_mixing_weights_ema_and_lp_ft_wise_ft(tmp_path, tiny_vit, monkeypatch):
    import json

    from conftest import digits_dataset, tiny_run

    from hf_finetune.outputs.files import RUN_SUMMARY

    monkeypatch.setenv("HF_FINETUNE_FEATURES_CACHE", str(tmp_path / "features"))
    data = digits_dataset(n_per_class=16)
    out = tmp_path / "out"
    results = tiny_run(
        tiny_vit, out, data, "--strategy", "lp_ft", "--wise_ft", "true", "--mixup_alpha", "0.8",
        "--cutmix_alpha", "1.0", "--label_smoothing_factor", "0.1", "--class_weights", "auto", "--ema", "true",
        "--auto_augment", "randaugment", "--random_erasing", "0.25", "--train_val_split", "0.25", epochs=2,
    )  # fmt: skip
    summary = json.loads((out / RUN_SUMMARY).read_text())
    probe = summary["lp_ft_probe"]
    assert set(probe) == {
        "probe_eval_accuracy",
        "probe_hyperparameters",
        "probe_seconds",
        "probe_train_samples",
    }
    assert probe["probe_train_samples"] == results["train_samples"]
    # The EMA and WiSE-FT choices are made on validation and reported with the figures they rest on.
    assert isinstance(results["ema_used"], bool)
    better = max(results["eval_raw_accuracy"], results["eval_ema_accuracy"])
    chosen = results["eval_ema_accuracy"] if results["ema_used"] else results["eval_raw_accuracy"]
    assert chosen == better
    assert results["wise_ft_alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    # The saved model is the chosen one: its validation accuracy is the WiSE-FT choice's.
    assert results["eval_accuracy"] == pytest.approx(results["eval_wise_ft_accuracy"])
    assert (
        results["eval_wise_ft_accuracy"] >= probe["probe_eval_accuracy"] - 1e-9
        or results["wise_ft_alpha"] > 0
    )
