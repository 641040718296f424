"""Checkpoint loading for a new label set: when the head is kept, when it is re-initialised."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_finetune.config import ModelArguments
from hf_finetune.errors import UserError
from hf_finetune.models.loading import load_config, load_model
from hf_finetune.testing.tiny import build_tiny_checkpoint


def checkpoint_tensors(folder):
    """The checkpoint's tensors under the names this transformers version gives them in memory."""
    return AutoModelForImageClassification.from_pretrained(folder).state_dict()


def test_identical_labels_keep_the_head(tiny_vit):
    model, report = load_model(ModelArguments(str(tiny_vit)), ["cat", "dog", "bird", "fish"])
    assert report.kept_head and report.reinitialised == []
    saved = checkpoint_tensors(tiny_vit)
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def test_same_count_different_labels_reinitialises_the_head(tiny_vit):
    # Four classes again, but not the same ones: the flag ignore_mismatched_sizes alone would keep the head.
    labels = ["ant", "bee", "cow", "dog"]
    model, report = load_model(ModelArguments(str(tiny_vit)), labels)
    assert not report.kept_head
    assert report.reinitialised == ["classifier.bias", "classifier.weight"]
    saved = checkpoint_tensors(tiny_vit)
    state = model.state_dict()
    assert not torch.equal(state["classifier.weight"], saved["classifier.weight"])
    assert torch.count_nonzero(state["classifier.bias"]) == 0
    backbone = [name for name in saved if not name.startswith("classifier.")]
    assert backbone and all(torch.equal(state[name], saved[name]) for name in backbone)
    assert model.config.id2label == dict(enumerate(labels))
    assert model.config.label2id == {label: i for i, label in enumerate(labels)}


def test_reordered_labels_also_reinitialise(tiny_vit):
    _, report = load_model(ModelArguments(str(tiny_vit)), ["dog", "cat", "bird", "fish"])
    assert not report.kept_head


def test_new_class_count_gives_new_head_shape(tiny_vit):
    model, report = load_model(ModelArguments(str(tiny_vit)), ["a", "b", "c", "d", "e", "f", "g"])
    assert model.classifier.weight.shape == (7, 32)
    assert "classifier.weight" in report.reinitialised


@pytest.mark.parametrize("arch", ["resnet", "convnext", "swin"])
def test_head_reinit_for_other_architectures(tmp_path, arch):
    folder = build_tiny_checkpoint(arch, tmp_path / arch, labels=["a", "b", "c"])
    model, report = load_model(ModelArguments(str(folder)), ["x", "y", "z"])
    saved = checkpoint_tensors(folder)
    head = set(report.reinitialised)
    assert head and all(name.startswith("classifier") for name in head)
    state = model.state_dict()
    for name, tensor in saved.items():
        if name not in head:
            assert torch.equal(state[name], tensor), name
        elif name.endswith("weight"):
            assert not torch.equal(state[name], tensor), name


def test_text_model_folder_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match=r"`bert` model.*image model"):
        load_config(ModelArguments(str(tmp_path / "bert")))


def test_missing_checkpoint_offline_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"`someone/no-such-model`.*HF_HUB_OFFLINE.*local folder"):
        load_config(ModelArguments("someone/no-such-model"))


def test_trust_remote_code_is_off_by_default():
    assert ModelArguments("x").trust_remote_code is False


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_checkpoint_weights_reload_through_renamed_keys(tmp_path, arch):
    # Trainer checkpoints store the serialised (legacy) names; a plain load_state_dict would load nothing.
    from hf_finetune.train.checkpoints import load_weights_from_checkpoint

    folder = build_tiny_checkpoint(arch, tmp_path / "a", labels=["a", "b"], seed=1)
    target = AutoModelForImageClassification.from_config(
        AutoModelForImageClassification.from_pretrained(folder).config
    )
    expected = checkpoint_tensors(folder)
    assert any(not torch.equal(t, expected[n]) for n, t in target.state_dict().items())
    load_weights_from_checkpoint(target, str(folder))
    assert all(torch.equal(t, expected[n]) for n, t in target.state_dict().items())


def test_from_scratch_keeps_the_architecture_but_no_pretrained_weight(tiny_vit):
    saved = checkpoint_tensors(tiny_vit)
    model, report = load_model(ModelArguments(str(tiny_vit), from_scratch=True), ["x", "y"])
    state = model.state_dict()
    assert model.config.id2label == {0: "x", 1: "y"} and model.classifier.out_features == 2
    weights = [
        n for n in saved if n.endswith("weight") and "norm" not in n and not n.startswith("classifier")
    ]
    assert weights and all(not torch.equal(state[n], saved[n]) for n in weights)
    assert len(report.reinitialised) == len(list(model.parameters()))


def test_new_head_uses_the_model_familys_own_initialisation(tmp_path):
    # ResNet heads start from PyTorch's fan-in scaled default (std ~ 1/sqrt(3 * fan_in)), ViT heads from
    # normal(0, 0.02): one hard-coded scheme for every family slows the new head's start.
    stds = {}
    for arch in ("resnet", "vit"):
        folder = build_tiny_checkpoint(arch, tmp_path / arch, labels=["a", "b", "c"])
        model, report = load_model(ModelArguments(str(folder)), ["x", "y", "z"])
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 3][-1]
        assert report.reinitialised
        stds[arch] = head.weight.std().item()
    assert stds["resnet"] > 0.08 and 0.01 < stds["vit"] < 0.03
