"""The model-card builder: metadata the Hub reads, sections contributed as data, a card rendered and never edited."""

from __future__ import annotations

import json
import logging

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from hf_finetune.outputs.card import (
    CARD,
    CARD_DATA,
    CardSection,
    ModelCardContent,
    add_card_section,
    read_card_content,
    write_model_card,
)
from hf_finetune.probe.export import FORMAT_PROBE, FORMAT_TRANSFORMERS, write_probe_card

RESULTS = {"eval_accuracy": 0.5, "test_accuracy": 0.75, "test_macro_f1": 0.7, "test_loss": 0.61, "epoch": 2.0}


def content(**changes) -> ModelCardContent:
    fields = {
        "model_name": "digits",
        "labels": ["zero", "one"],
        "results": RESULTS,
        "base_model": "google/vit-base-patch16-224",
        "dataset_name": "someone/digits",
        "strategy": "head",
        "strategy_settings": {"strategy": "head"},
        "license": "apache-2.0",
        "sections": [CardSection("Evaluation reports", "![Confusion matrix](confusion_matrix.png)")],
    }
    return ModelCardContent(**{**fields, **changes})


def test_card_metadata_is_what_the_hub_reads(tmp_path):
    write_model_card(tmp_path, content(repo_id="me/digits"))
    card = ModelCard.load(tmp_path / CARD)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-classification"
    assert data["base_model"] == "google/vit-base-patch16-224" and data["datasets"] == ["someone/digits"]
    assert data["license"] == "apache-2.0"
    assert data["tags"] == ["image-classification", "hf-finetune", "strategy-head"]
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "digits"
    # The test split's metrics (not validation's), in the order of INDEXED_METRICS.
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in results] == [
        ("accuracy", 0.75, "test"),
        ("macro_f1", 0.7, "test"),
    ]
    assert all(r.dataset_type == "someone/digits" for r in results)
    text = card.text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Results", "## Training", "## Labels", "## How to use", "## Evaluation reports"]
    assert "| test | accuracy | 0.7500 |" in text and "| validation | accuracy | 0.5000 |" in text
    assert "epoch" not in text.split("## Results")[1].split("## Training")[0]
    assert "- `strategy`: `head`" in text and "`zero`, `one`" in text
    assert 'pipeline("image-classification", model="me/digits")' in text
    assert (
        "fine-tuned from [google/vit-base-patch16-224](https://huggingface.co/google/vit-base-patch16-224)"
        in text
    )


def test_local_checkpoint_and_data_are_not_named_by_path(tmp_path):
    checkpoint, folder = tmp_path / "my_checkpoint", tmp_path / "pictures"
    checkpoint.mkdir()
    folder.mkdir()
    write_model_card(tmp_path / "out", content(base_model=str(checkpoint), dataset_name=str(folder)))
    text = (tmp_path / "out" / CARD).read_text()
    data = ModelCard.load(tmp_path / "out" / CARD).data.to_dict()
    assert "base_model" not in data and "datasets" not in data
    assert "a local checkpoint" in text and "a local image dataset" in text
    assert str(tmp_path) not in text and str(tmp_path) not in (tmp_path / "out" / CARD_DATA).read_text()
    _, results = model_index_to_eval_results(data["model-index"])
    assert results[0].dataset_type == "imagefolder"


def test_a_timm_output_is_filed_under_timm_with_timm_usage(tmp_path):
    write_model_card(tmp_path, content(library_name="timm", base_model="timm/tf_efficientnet_lite0.in1k"))
    card = ModelCard.load(tmp_path / CARD)
    assert card.data.library_name == "timm" and card.data.base_model == "timm/tf_efficientnet_lite0.in1k"
    usage = card.text.split("## How to use")[1].split("## Evaluation reports")[0]
    assert 'pipeline("image-classification", model="path/to/this/folder")' in usage
    assert 'timm.create_model("local-dir:path/to/this/folder", pretrained=True)' in usage


def test_a_contributed_section_is_added_once_and_replaced_after(tmp_path):
    write_model_card(tmp_path, content())
    before = ModelCard.load(tmp_path / CARD)
    assert add_card_section(tmp_path, CardSection("Comparison with other ways to transfer", "| first |"))
    assert add_card_section(tmp_path, CardSection("Comparison with other ways to transfer", "| second |"))
    after = ModelCard.load(tmp_path / CARD)
    assert after.data.to_dict() == before.data.to_dict()
    assert after.text.count("## Comparison with other ways to transfer") == 1
    assert "| second |" in after.text and "| first |" not in after.text
    # Appended after the sections already there; everything before it is the card as it was.
    assert after.text.startswith(before.text.rstrip("\n"))
    assert [s.title for s in read_card_content(tmp_path).sections] == [
        "Evaluation reports",
        "Comparison with other ways to transfer",
    ]


def test_a_card_without_its_content_is_left_as_it_is(tmp_path, caplog):
    (tmp_path / CARD).write_text("---\nlicense: mit\n---\n# Written elsewhere\n")
    with caplog.at_level(logging.WARNING, logger="hf_finetune.outputs.card"):
        assert not add_card_section(tmp_path, CardSection("Comparison with other ways to transfer", "x"))
    assert (tmp_path / CARD).read_text() == "---\nlicense: mit\n---\n# Written elsewhere\n"
    assert CARD_DATA in caplog.text and "Comparison with other ways to transfer" in caplog.text


def test_section_markdown_must_open_with_its_title():
    section = CardSection.from_markdown("## LoRA: adapter only\n\nThe adapter.\n")
    assert (section.title, section.body) == ("LoRA: adapter only", "The adapter.")
    assert CardSection.from_markdown("  \n") is None
    with pytest.raises(ValueError, match="## title"):
        CardSection.from_markdown("The adapter, with no heading.")


@pytest.mark.parametrize("fmt", [FORMAT_TRANSFORMERS, FORMAT_PROBE])
def test_probe_cards_say_whether_pipeline_loads_them(tmp_path, fmt):
    given = content(repo_id="me/probe", sections=[None, CardSection("Evaluation reports", "reports")])
    write_probe_card(tmp_path, fmt, given)
    card = ModelCard.load(tmp_path / CARD)
    usage = card.text.split("## How to use")[1]
    assert card.text.count("## How to use") == 1 and usage.index("```python") < usage.index("## Evaluation")
    if fmt == FORMAT_TRANSFORMERS:
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
        assert "plain `transformers` checkpoint" in usage and 'model="me/probe"' in usage
    else:
        # Hub metadata must not advertise a transformers pipeline this folder does not have.
        assert card.data.library_name == "hf-finetune" and card.data.pipeline_tag is None
        assert "not a plain `transformers` model" in usage and 'load_probe("me/probe")' in usage
        assert "from hf_finetune.probe.load import load_probe" in usage
    assert json.loads((tmp_path / CARD_DATA).read_text())["library_name"] == card.data.library_name


def test_a_runs_card_takes_name_repository_license_and_library_from_the_run(tmp_path):
    from types import SimpleNamespace

    out = tmp_path / "digits-run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "timm_wrapper", "architecture": "resnet18"}))
    data_args = SimpleNamespace(dataset_name="someone/digits")
    named = ModelCardContent.for_run(
        out, SimpleNamespace(hub_model_id="me/digits", license="mit"), data_args, labels=["a"], results={}
    )
    assert (named.model_name, named.repo_id, named.license) == ("me/digits", "me/digits", "mit")
    assert named.dataset_name == "someone/digits" and named.library_name == "timm"
    unnamed = ModelCardContent.for_run(
        out, SimpleNamespace(hub_model_id=None, license=None), data_args, labels=["a"], results={}
    )
    assert (unnamed.model_name, unnamed.repo_id, unnamed.load_from) == (
        "digits-run",
        None,
        "path/to/this/folder",
    )


def test_hub_names_stay_as_first_written_when_the_card_is_rendered_again(tmp_path, monkeypatch):
    write_model_card(tmp_path / "out", content())
    # Rendering again from a folder where a local `google/...` folder happens to exist changes nothing.
    (tmp_path / "google" / "vit-base-patch16-224").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert add_card_section(tmp_path / "out", CardSection("Comparison with other ways to transfer", "x"))
    assert ModelCard.load(tmp_path / "out" / CARD).data.base_model == "google/vit-base-patch16-224"
