"""timm checkpoints in the Hub's timm layout, through every path: loading, labels, pixels, strategies, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import digits_dataset, run_training, tiny_run
from datasets import DatasetDict

from hf_finetune.config import ModelArguments
from hf_finetune.models.loading import load_image_processor, load_model
from hf_finetune.testing.tiny import build_tiny_timm_checkpoint

CHECKPOINT_LABELS = ["cat", "dog", "bird"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_transformers_still_needs_the_num_classes_workaround():
    """When this fails, transformers loads timm's model_args with num_classes: drop_timm_num_classes_arg can go."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    # What timm >= 1.0.31's save_for_hf / push_to_hf_hub write into config.json.
    config = TimmWrapperConfig(architecture="test_efficientnet", num_labels=3, model_args={"num_classes": 3})
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


# --------------------------------------------------------------------------------------------------------
# The block map from timm's own metadata
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "architecture, embeddings, blocks, final_norm, head",
    [
        ("test_efficientnet", ("conv_stem", "bn1"), 5, ("conv_head", "bn2"), ("classifier",)),
        ("test_vit", ("cls_token", "pos_embed", "patch_embed"), 6, ("norm",), ("head",)),
        ("resnet10t", ("conv1", "bn1"), 4, (), ("fc",)),
        ("test_convnext", ("stem",), 4, ("head.norm",), ("head.fc",)),
        ("mobilenetv3_small_050", ("conv_stem", "bn1"), 6, ("conv_head",), ("classifier",)),
    ],
)
def test_block_map_of_any_timm_architecture_comes_from_timm(
    architecture, embeddings, blocks, final_norm, head
):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from hf_finetune.models.architectures import block_map, feature_dim

    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=3))
    mapped = block_map(model)  # every parameter in exactly one group, or it raises

    def strip(names):
        return tuple(name.removeprefix("timm_model.") for name in names)

    assert strip(mapped.embeddings) == embeddings and len(mapped.blocks) == blocks
    assert strip(mapped.final_norm) == final_norm and strip(mapped.head) == head
    assert feature_dim(model) == model.timm_model.get_classifier().in_features


def test_probe_features_are_timms_pre_logits(timm_vit):
    from hf_finetune.models.architectures import classifier_input

    model, _ = load_model(ModelArguments(model_name_or_path=str(timm_vit)), CHECKPOINT_LABELS)
    pixels = torch.randn(2, 3, 32, 32)
    features = classifier_input(model, pixels)
    with torch.no_grad():
        expected = model.timm_model.forward_head(model.timm_model.forward_features(pixels), pre_logits=True)
        logits = model(pixel_values=pixels).logits
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(model.timm_model.get_classifier()(features), logits)


def test_lora_default_targets_of_timm_models(timm_checkpoint, timm_vit):
    from hf_finetune.strategies.lora import default_target_modules

    vit, _ = load_model(ModelArguments(model_name_or_path=str(timm_vit)), CHECKPOINT_LABELS)
    targets = default_target_modules(vit)
    assert targets and all(t.endswith(("attn.qkv", "attn.proj")) for t in targets) and len(targets) == 12
    effnet, _ = load_model(ModelArguments(model_name_or_path=str(timm_checkpoint)), CHECKPOINT_LABELS)
    modules = dict(effnet.named_modules())
    targets = default_target_modules(effnet)
    assert targets and all(t.startswith("timm_model.blocks.") for t in targets)
    assert all(modules[t].groups == 1 for t in targets)  # no depthwise convolution


# --------------------------------------------------------------------------------------------------------
# Every strategy on the tiny timm-layout checkpoint
# --------------------------------------------------------------------------------------------------------
def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _train(checkpoint, data, output_dir, strategy, *extra):
    return tiny_run(checkpoint, output_dir, data, "--strategy", strategy, *extra, epochs=2)


def _changed(before, after) -> set[str]:
    return {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}


@pytest.mark.parametrize("strategy", ["full", "head", "last_n", "gradual", "llrd", "lora"])
def test_each_strategy_trains_the_timm_checkpoint(strategy, timm_checkpoint, data, tmp_path):
    # The last epoch's weights (tiny_run: no best-model reload): what each strategy trained by then is checked.
    results = _train(timm_checkpoint, data, tmp_path, strategy)
    assert 0.0 <= results["test_accuracy"] <= 1.0
    before, after = _weights(timm_checkpoint / "model.safetensors"), _weights(tmp_path / "model.safetensors")
    assert set(after) == set(before)  # the output is a plain timm state dict again (no wrapper prefix)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architecture"] == "test_efficientnet"
    assert saved["label_names"] == data["train"].features["label"].names
    changed = {
        name.split(".")[0] if not name.startswith("blocks.") else ".".join(name.split(".")[:2])
        for name in _changed(before, after)
    }
    summary = json.loads((tmp_path / "strategy_summary.json").read_text())
    if strategy == "head":
        assert changed == {"classifier"}
    elif strategy == "last_n":  # the top two blocks (stages), the final norm and the head
        assert changed == {"blocks.3", "blocks.4", "conv_head", "bn2", "classifier"}
    elif strategy == "gradual":  # head first, then one block group more per epoch, top down
        assert summary["unfreezing_schedule"][0] == {"epoch": 1, "unfreezes": ["block_4", "final_norm"]}
        assert changed == {"blocks.4", "conv_head", "bn2", "classifier"}
    elif (
        strategy == "llrd"
    ):  # final norm at the full rate, then x 0.75 per block, embeddings last; the new head x10
        rates = {g["group"]: g["learning_rate"] for g in summary["block_groups"]}
        assert rates["final_norm"] == pytest.approx(0.01) and rates["head"] == pytest.approx(0.1)
        assert [rates[f"block_{i}"] for i in range(5)] == pytest.approx(
            [0.01 * 0.75 ** (5 - i) for i in range(5)]
        )
        assert rates["embeddings"] == pytest.approx(0.01 * 0.75**6)
        assert "conv_stem" in changed and "classifier" in changed
    elif strategy == "lora":
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        # Merged: the adapted convolutions changed; BatchNorms and unadapted layers did not.
        assert "classifier" in changed and "conv_stem" not in changed and "bn2" not in changed
        assert summary["lora"]["modules_to_save"] == ["timm_model.classifier"]
    else:
        assert {"conv_stem", "blocks.0", "blocks.4", "classifier"} <= changed


def test_probe_on_the_timm_checkpoint_is_written_into_its_head(timm_checkpoint, data, tmp_path):
    from transformers import pipeline

    from hf_finetune.probe.arguments import parse_probe_args
    from hf_finetune.probe.run import run_probe

    args = parse_probe_args(
        ["--model_name_or_path", str(timm_checkpoint), "--output_dir", str(tmp_path / "probe"),
         "--feature_cache_dir", str(tmp_path / "cache"), "--dataloader_num_workers", "0"]
    )  # fmt: skip
    results = run_probe(*args, dataset=data)
    before = _weights(timm_checkpoint / "model.safetensors")
    after = _weights(tmp_path / "probe" / "model.safetensors")
    assert _changed(before, after) == {"classifier.weight", "classifier.bias"}
    classify = pipeline("image-classification", model=str(tmp_path / "probe"))
    names = data["test"].features["label"].names
    hits = [
        classify(image)[0]["label"] == names[label]
        for image, label in zip(data["test"]["image"], data["test"]["label"], strict=True)
    ]
    assert abs(sum(hits) / len(hits) - results["test_accuracy"]) <= 1 / len(hits)
    card = (tmp_path / "probe" / "README.md").read_text()
    assert "library_name: timm" in card and 'timm.create_model("local-dir:' in card


# --------------------------------------------------------------------------------------------------------
# End to end: pipeline() on the output reproduces the run's test accuracy
# --------------------------------------------------------------------------------------------------------
def _picture_folders(root):
    """The digits as train / test image folders of PNG files (what a user points a run at)."""
    for split, (count, offset) in {"train": (10, 0), "test": (6, 40)}.items():
        dataset = digits_dataset(count, offset=offset)
        names = dataset.features["label"].names
        for index, (image, label) in enumerate(zip(dataset["image"], dataset["label"], strict=True)):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:03d}.png")
    return root / "train", root / "test"


@pytest.mark.parametrize("kind", ["transformers", "timm"])
def test_pipeline_on_the_output_reproduces_the_test_accuracy(kind, timm_checkpoint, tmp_path):
    from transformers import pipeline

    from hf_finetune.commands.predict import predict_paths
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    checkpoint = (
        timm_checkpoint
        if kind == "timm"
        else build_tiny_checkpoint("vit", tmp_path / "vit", labels=CHECKPOINT_LABELS)
    )
    train_dir, test_dir = _picture_folders(tmp_path / "pictures")
    output_dir = tmp_path / "out"
    results = run_training(
        ["--model_name_or_path", str(checkpoint), "--output_dir", str(output_dir), "--train_dir", str(train_dir),
         "--test_dir", str(test_dir), "--num_train_epochs", "3", "--learning_rate", "0.005",
         "--per_device_train_batch_size", "8",
         # 24 training pictures, three full batches: a last batch of one picture would fail in BatchNorm (train
         # mode) at the 1x1 grid of the 32-px model.
         "--train_val_split", "0.2",
         # The real run's path (evaluation every epoch, best-model reload) in one process.
         "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    )  # fmt: skip
    classify = pipeline("image-classification", model=str(output_dir))
    files = sorted(test_dir.glob("*/*.png"))
    hits = [classify(str(path))[0]["label"] == path.parent.name for path in files]
    assert results["test_samples"] == len(files)
    assert abs(sum(hits) / len(hits) - results["test_accuracy"]) <= 1 / len(files)
    # hf-finetune predict answers as pipeline() does.
    rows = predict_paths(output_dir, [test_dir], top_k=1, device="cpu")
    assert [row["labels"][0] for row in rows] == [classify(str(p))[0]["label"] for p in files]
    card = (output_dir / "README.md").read_text()
    assert f"library_name: {kind}" in card
    assert ('timm.create_model("local-dir:' in card) == (kind == "timm")


def test_channels_last_auto_follows_the_timm_architecture(timm_checkpoint, timm_vit):
    from hf_finetune.train.speed import wants_channels_last

    convnet, _ = load_model(ModelArguments(model_name_or_path=str(timm_checkpoint)), CHECKPOINT_LABELS)
    vit, _ = load_model(ModelArguments(model_name_or_path=str(timm_vit)), CHECKPOINT_LABELS)
    assert wants_channels_last(convnet, "auto", "cuda") and not wants_channels_last(vit, "auto", "cuda")
    assert wants_channels_last(convnet, "auto", "cpu") and not wants_channels_last(vit, "auto", "cpu")


def test_model_card_of_a_timm_hub_checkpoint_names_it_as_base_model():
    from hf_finetune.outputs.card import ModelCardContent, model_card

    card = str(
        model_card(
            ModelCardContent(
                model_name="digits",
                base_model="timm/tf_efficientnet_lite0.in1k",
                dataset_name=None,
                labels=["a", "b"],
                results={"test_accuracy": 0.5},
                repo_id="you/digits",
                library_name="timm",
            )
        )
    )
    assert "base_model: timm/tf_efficientnet_lite0.in1k" in card and "library_name: timm" in card
    assert 'pipeline("image-classification", model="you/digits")' in card
    assert 'timm.create_model("hf-hub:you/digits", pretrained=True)' in card
