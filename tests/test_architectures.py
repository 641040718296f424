"""Tiny checkpoints and the block map, over every supported architecture (offline, a few seconds)."""

import pytest
import torch
from conftest import MysteryNet
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

from hf_finetune.errors import UserError
from hf_finetune.models.architectures import block_map, classifier_input, feature_dim
from hf_finetune.testing.tiny import TINY_ARCHITECTURES, build_tiny_checkpoint, tiny_config

LABELS = ["cat", "dog", "bird"]
BATCHNORM_ARCHITECTURES = ("resnet", "regnet", "mobilenet_v2", "efficientnet")
PROCESSOR_CLASSES = {
    "vit": "ViTImageProcessor",
    "deit": "DeiTImageProcessor",
    "beit": "BeitImageProcessor",
    "dinov2": "BitImageProcessor",
    "swin": "ViTImageProcessor",
    "convnext": "ConvNextImageProcessor",
    "resnet": "ConvNextImageProcessor",
    "regnet": "ConvNextImageProcessor",
    "mobilenet_v2": "MobileNetV2ImageProcessor",
    "efficientnet": "EfficientNetImageProcessor",
}


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    arch = request.param
    return arch, build_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), LABELS)


@pytest.fixture
def model(checkpoint):
    return AutoModelForImageClassification.from_pretrained(checkpoint[1]).eval()


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _head_linear(model):
    return next(m for m in model.classifier.modules() if isinstance(m, nn.Linear))


def test_checkpoint_reloads_with_identical_weights_and_processor(checkpoint, model):
    arch, folder = checkpoint
    assert (folder / "model.safetensors").is_file()
    torch.manual_seed(0)
    fresh = AutoModelForImageClassification.from_config(tiny_config(arch, LABELS))
    expected, reloaded = fresh.state_dict(), model.state_dict()
    assert expected.keys() == reloaded.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, reloaded[name]), name
    assert model.config.model_type == arch
    assert [model.config.id2label[i] for i in range(len(LABELS))] == LABELS

    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__name__.startswith(PROCESSOR_CLASSES[arch])
    image = Image.new("RGB", (50, 40), color=(200, 30, 90))
    assert processor(images=image, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_seed_changes_weights(tmp_path):
    first = build_tiny_checkpoint("vit", tmp_path / "a", LABELS, seed=0)
    again = build_tiny_checkpoint("vit", tmp_path / "b", LABELS, seed=0)
    other = build_tiny_checkpoint("vit", tmp_path / "c", LABELS, seed=1)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_unknown_tiny_architecture_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="vit, deit, beit"):
        build_tiny_checkpoint("alexnet", tmp_path, LABELS)


def test_forward_gives_one_logit_per_label(model, pixels):
    with torch.no_grad():
        assert model(pixel_values=pixels).logits.shape == (2, len(LABELS))


def test_every_parameter_belongs_to_exactly_one_group(model):
    mapped = block_map(model)
    groups = mapped.groups()
    assert len(mapped.blocks) >= 2
    assert [g for g, _ in groups][0] == "embeddings" and groups[-1][0] == "head"
    assert [g for g, _ in groups if g.startswith("block_")] == [
        f"block_{i}" for i in range(len(mapped.blocks))
    ]
    modules = dict(model.named_modules())
    assert all(name in modules for _, names in groups for name in names)
    for param_name, _ in model.named_parameters():
        owners = [g for g, names in groups if any(param_name.startswith(n + ".") for n in names)]
        assert len(owners) == 1, (param_name, owners)
        assert mapped.module_of_parameter(param_name) == owners[0]


def test_classifier_input_reproduces_logits(model, pixels):
    model.train()
    features = classifier_input(model, pixels)
    assert model.training, "classifier_input must restore the model's mode"
    assert features.shape == (2, feature_dim(model))
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        assert torch.allclose(_head_linear(model)(features), logits, atol=1e-5)


@pytest.mark.parametrize("arch", BATCHNORM_ARCHITECTURES)
def test_conv_architectures_keep_their_batchnorm(arch):
    model = AutoModelForImageClassification.from_config(tiny_config(arch, LABELS))
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_unknown_model_type_lists_modules_and_points_to_regexes(pixels):
    model = MysteryNet()
    with pytest.raises(UserError) as raised:
        block_map(model)
    message = str(raised.value)
    for expected in (
        "mystery_net",
        "backbone.stem",
        "backbone.body",
        "classifier",
        "freeze_modules",
        "train_modules",
    ):
        assert expected in message
    # The feature path still works: the head is found beside the base model.
    assert classifier_input(model, pixels).shape == (2, 4)


def test_model_without_head_is_a_user_error(pixels):
    bare = AutoModel.from_config(tiny_config("vit", LABELS))
    assert len(block_map(bare).blocks) == 2
    with pytest.raises(UserError, match="'vit'"):
        classifier_input(bare, pixels)
