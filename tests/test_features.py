"""The feature cache: computed once, reused with no forward pass, invalidated by what the features depend on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import digits_dataset
from transformers import AutoModel, BertConfig

from hf_finetune.compat import dataset_fingerprint
from hf_finetune.config import DataArguments, ModelArguments
from hf_finetune.data.prepare import prepare_data
from hf_finetune.errors import UserError
from hf_finetune.models.architectures import classifier_input
from hf_finetune.probe import cache as C
from hf_finetune.probe import features as F
from hf_finetune.testing.counters import count_backbone_forwards
from hf_finetune.testing.tiny import build_tiny_checkpoint, tiny_config

LABELS = ["digit_0", "digit_1", "digit_2"]


@pytest.fixture(scope="module")
def data():
    # 3 classes x 12 images, split 2/3 train, 1/3 validation: tiny but with a real fingerprint chain.
    return prepare_data(DataArguments(train_val_split=0.34), seed=0, dataset=digits_dataset(12))


@pytest.fixture
def checkpoint(tmp_path):
    return build_tiny_checkpoint("vit", tmp_path / "vit", labels=["cat", "dog"])


def _extract(folder, data, cache, **kwargs):
    backbone = F.Backbone(ModelArguments(model_name_or_path=str(folder)))
    report = F.ExtractionReport()
    out = F.extract_features(
        backbone,
        data.splits,
        data.image_column,
        data.label_column,
        data.labels,
        cache,
        report=report,
        **kwargs,
    )
    return backbone, out, report


def test_miss_then_hit_with_no_forward_pass(checkpoint, data, tmp_path):
    cache = C.FeatureCache(tmp_path / "cache")
    with count_backbone_forwards() as passes:
        backbone, cold, report = _extract(checkpoint, data, cache, batch_size=5)
    rows = {name: len(split) for name, split in data.splits.items()}
    # Written batch by batch: one forward pass per batch of 5, and each split says how many it took.
    assert passes.batches == sum(-(-n // 5) for n in rows.values())
    assert {name: split.forward_passes for name, split in cold.items()} == {
        name: -(-n // 5) for name, n in rows.items()
    }
    assert [e["cache"] for e in report.entries] == ["miss", "miss"]
    for name, split in cold.items():
        assert split.features.shape == (rows[name], 32) and split.features.dtype == np.float32
        assert (split.path / C.FEATURES_FILE).is_file() and (split.path / C.META_FILE).is_file()
        meta = json.loads((split.path / C.META_FILE).read_text())
        assert meta["split"] == name and meta["fingerprint"] == dataset_fingerprint(data.splits[name])
    assert cold["train"].path != cold["validation"].path  # the split name is part of the key

    # The rows are the pooled features of the images in dataset order.
    model = backbone.model(data.labels)
    pixels = torch.stack(
        [backbone.eval_transform(img.convert("RGB")) for img in data.splits["train"][:3]["image"]]
    )
    np.testing.assert_allclose(cold["train"].features[:3], classifier_input(model, pixels).numpy(), atol=1e-5)

    with count_backbone_forwards() as passes:
        warm_backbone, warm, report = _extract(checkpoint, data, cache)
    assert passes.batches == 0 and all(split.forward_passes == 0 for split in warm.values())
    assert [e["cache"] for e in report.entries] == ["hit", "hit"] and report.forward_free
    assert warm_backbone._model is None, "a warm cache must not even load the weights"
    for name in rows:
        assert warm[name].from_cache
        np.testing.assert_array_equal(warm[name].features, cold[name].features)
        np.testing.assert_array_equal(warm[name].labels, np.asarray(data.splits[name]["label"]))


def _entries(cache):
    return sorted(p.name for p in cache.root.iterdir() if not p.name.startswith("."))


def test_changed_checkpoint_processor_or_data_invalidates(checkpoint, data, tmp_path):
    cache = C.FeatureCache(tmp_path / "cache")
    _extract(checkpoint, data, cache)
    assert len(_entries(cache)) == 2

    # New labels in config.json only: the features are the same, so the entries are reused.
    config = json.loads((checkpoint / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "x", "1": "y"}, {"x": 0, "y": 1}
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert [e["cache"] for e in _extract(checkpoint, data, cache)[2].entries] == ["hit", "hit"]

    # Other weights in the same folder: miss.
    build_tiny_checkpoint("vit", checkpoint, labels=["cat", "dog"], seed=1)
    assert [e["cache"] for e in _extract(checkpoint, data, cache)[2].entries] == ["miss", "miss"]
    assert len(_entries(cache)) == 4

    # Different processor settings (normalisation statistics): miss.
    processor_file = checkpoint / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text())
    processor["image_mean"] = [0.4, 0.4, 0.4]
    processor_file.write_text(json.dumps(processor))
    assert [e["cache"] for e in _extract(checkpoint, data, cache)[2].entries] == ["miss", "miss"]

    # Different data (one more image per class, so a new fingerprint for every split): miss.
    more = prepare_data(DataArguments(train_val_split=0.34), seed=0, dataset=digits_dataset(13))
    assert [e["cache"] for e in _extract(checkpoint, more, cache)[2].entries] == ["miss", "miss"]

    # A different split seed changes which images are in each split: miss.
    reshuffled = prepare_data(DataArguments(train_val_split=0.34), seed=1, dataset=digits_dataset(12))
    assert [e["cache"] for e in _extract(checkpoint, reshuffled, cache)[2].entries] == ["miss", "miss"]
    assert len(_entries(cache)) == 10


def test_image_folder_fingerprint_changes_with_a_file(tmp_path, checkpoint):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (40 * i, 100 if cls == "a" else 10, 0)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    args = DataArguments(train_dir=str(tmp_path / "imgs"), train_val_split=0.34)
    cache = C.FeatureCache(tmp_path / "cache")
    first = prepare_data(args, seed=0, cache_dir=str(tmp_path / "hf"))
    assert [e["cache"] for e in _extract(checkpoint, first, cache)[2].entries] == ["miss", "miss"]
    again = prepare_data(args, seed=0, cache_dir=str(tmp_path / "hf"))
    assert [e["cache"] for e in _extract(checkpoint, again, cache)[2].entries] == ["hit", "hit"]
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "imgs" / "a" / "0.png")
    edited = prepare_data(args, seed=0, cache_dir=str(tmp_path / "hf"))
    assert "miss" in [e["cache"] for e in _extract(checkpoint, edited, cache)[2].entries]


def test_recompute_and_damaged_entries(checkpoint, data, tmp_path):
    cache = C.FeatureCache(tmp_path / "cache")
    _, cold, _ = _extract(checkpoint, data, cache)
    assert [e["cache"] for e in _extract(checkpoint, data, cache, recompute=True)[2].entries] == [
        "miss",
        "miss",
    ]
    # Labels that no longer line up with the rows: the entry is not trusted.
    np.save(cold["train"].path / C.LABELS_FILE, np.zeros(len(data.splits["train"]), dtype=np.int64))
    assert [e["cache"] for e in _extract(checkpoint, data, cache)[2].entries] == ["miss", "hit"]
    # No meta.json (an entry that was never completed): not found.
    (cold["validation"].path / C.META_FILE).unlink()
    assert [e["cache"] for e in _extract(checkpoint, data, cache)[2].entries] == ["hit", "miss"]


def test_interrupted_write_leaves_no_entry(checkpoint, data, tmp_path):
    cache = C.FeatureCache(tmp_path / "cache")
    backbone = F.Backbone(ModelArguments(model_name_or_path=str(checkpoint)))
    key = backbone.key(dataset_fingerprint(data.splits["train"]), "train")

    def fail(matrix):
        matrix[:2] = 1.0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.write(key, fail, 10, 32, np.zeros(10, dtype=np.int64))
    assert list(cache.root.iterdir()) == []
    assert cache.load(key, np.zeros(10, dtype=np.int64)) is None


def test_hub_identity_uses_the_cached_commit(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    args = ModelArguments(model_name_or_path="org/model", cache_dir=str(tmp_path / "hub"))
    assert C.checkpoint_identity(args) == {"kind": "hub", "repo": "org/model", "commit": sha}
    # A pinned commit is its own identity; an unknown one falls back to the revision name.
    pinned = ModelArguments(
        model_name_or_path="org/other", model_revision="f" * 40, cache_dir=str(tmp_path / "hub")
    )
    assert C.checkpoint_identity(pinned)["commit"] == "f" * 40
    unknown = ModelArguments(
        model_name_or_path="org/other", model_revision="v2", cache_dir=str(tmp_path / "hub")
    )
    assert C.checkpoint_identity(unknown) == {"kind": "hub", "repo": "org/other", "revision": "v2"}


def test_identity_ignores_labels_but_not_weights(tmp_path):
    a = build_tiny_checkpoint("resnet", tmp_path / "a", labels=["x", "y"])
    b = build_tiny_checkpoint("resnet", tmp_path / "b", labels=["p", "q", "r"])  # same seed, other head
    c = build_tiny_checkpoint("resnet", tmp_path / "c", labels=["x", "y"], seed=3)
    ids = [C.checkpoint_identity(ModelArguments(model_name_or_path=str(p))) for p in (a, b, c)]
    assert ids[0] == C.checkpoint_identity(
        ModelArguments(model_name_or_path=str(shutil.copytree(a, tmp_path / "copy")))
    )
    assert ids[0] != ids[2]
    assert ids[0]["config"] == ids[1]["config"]  # only the label set differs in config.json


def test_split_checkpoints():
    args = ModelArguments(model_name_or_path="org/a, ./b", model_revision="v1")
    assert [(m.model_name_or_path, m.model_revision) for m in F.split_checkpoints(args)] == [
        ("org/a", "v1"),
        ("./b", "v1"),
    ]
    for bad in ("org/a,,org/b", "org/a,org/a"):
        with pytest.raises(UserError, match="model_name_or_path"):
            F.split_checkpoints(ModelArguments(model_name_or_path=bad))


def test_non_image_checkpoint_is_named(tmp_path):
    folder = tmp_path / "bert-folder"
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    ).save_pretrained(folder)
    with pytest.raises(UserError, match="bert-folder") as raised:
        F.Backbone(ModelArguments(model_name_or_path=str(folder)))
    assert "image" in str(raised.value)


def test_checkpoint_without_pooled_output_is_named(checkpoint, data, tmp_path):
    backbone = F.Backbone(ModelArguments(model_name_or_path=str(checkpoint)))
    backbone._model, backbone._labels = AutoModel.from_config(tiny_config("vit", LABELS)), data.labels
    with pytest.raises(UserError, match=f"Checkpoint `{checkpoint}` has no pooled output"):
        F.extract_features(
            backbone, data.splits, data.image_column, data.label_column, data.labels, C.FeatureCache(tmp_path)
        )
    with pytest.raises(UserError, match="`headless` has no pooled output"):
        F.embed_batch(backbone._model, torch.zeros(1, 3, 32, 32), "headless")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(C.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert C.default_cache_dir() == tmp_path / "hf_finetune" / "features"
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert C.FeatureCache().root == tmp_path / "elsewhere"
