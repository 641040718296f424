"""compare: every method on the same split, a row each (ok, skipped with a reason, or failed with a reason)."""

from __future__ import annotations

import json

import pytest
from conftest import digits_dataset
from datasets import DatasetDict
from huggingface_hub import ModelCard
from PIL import Image

from hf_finetune.commands.compare import compare, parse_compare_args
from hf_finetune.errors import UserError
from hf_finetune.outputs.comparison import COMPARISON_JSON, COMPARISON_MD, PLOT_PARAMS, PLOT_TIME
from hf_finetune.testing.tiny import build_tiny_checkpoint

LABELS = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def data():
    return DatasetDict(
        {
            "train": digits_dataset(16, names=LABELS),
            "validation": digits_dataset(6, names=LABELS, offset=16),
            "test": digits_dataset(6, names=LABELS, offset=22),
        }
    )


def argv(checkpoints, out, methods, *extra):
    return ["--model_name_or_path", ",".join(str(c) for c in checkpoints), "--output_dir", str(out),
            "--compare_methods", *methods, "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
            "--use_cpu", "true", "--dataloader_num_workers", "0", "--feature_cache_dir", str(out / "features"),
            "--c_values", "1.0", *extra]  # fmt: skip


def table_cells(table: str) -> dict[str, list[str]]:
    """method -> the other cells of its row in comparison.md."""
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")][1:]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_compare_writes_one_table_two_plots_and_a_folder_per_method(tmp_path, data):
    vit = build_tiny_checkpoint("vit", tmp_path / "vit", labels=["a", "b", "c", "d"])
    resnet = build_tiny_checkpoint("resnet", tmp_path / "resnet", labels=["a", "b"])
    out = tmp_path / "cmp"
    methods = ["scratch", "as_is", "probe_logistic_regression", "head", "full", "fusion", "lora"]
    rows = compare(*parse_compare_args(argv([vit, resnet], out, methods, "--lora_target_modules", "nope")),
                   dataset=data)  # fmt: skip
    by_name = {row["method"]: row for row in rows}
    assert [row["method"] for row in rows] == methods
    assert by_name["as_is"]["status"] == "skipped" and "labels" in by_name["as_is"]["reason"]
    # A failing method is a row that says why; the others still ran.
    assert by_name["lora"]["status"] == "failed" and "nope" in by_name["lora"]["reason"]
    table = (out / COMPARISON_MD).read_text()
    cells = table_cells(table)
    # One table row per method asked for, in that order.
    assert list(cells) == methods
    for name in ("scratch", "probe_logistic_regression", "head", "full", "fusion"):
        row = by_name[name]
        assert row["status"] == "ok", row
        assert row["split"] == "test"
        assert row["wall_time_s"] > 0 and row["trainable_parameters"] > 0
        # CPU time of the method in this process, and what each CPU-minute of it bought.
        assert row["cpu_time_s"] > 0 and row["accuracy_per_cpu_minute"] == round(
            row["accuracy"] / (row["cpu_time_s"] / 60), 4
        )
        results = json.loads((out / name / "all_results.json").read_text())
        assert results["test_accuracy"] == row["accuracy"] and results["test_macro_f1"] == row["macro_f1"]
        # The table shows each method's own results, as its folder holds them.
        assert cells[name][:2] == [f"{results['test_accuracy']:.4f}", f"{results['test_macro_f1']:.4f}"]
        assert cells[name][2] == f"{row['trainable_parameters']:,}"
        # Each method's card carries the same table, once, and stays a card the Hub reads.
        card = ModelCard.load(out / name / "README.md")
        assert card.text.count("## Comparison with other ways to transfer") == 1
        assert table.split("\n\n")[0] in card.text
        assert card.data.library_name == ("hf-finetune" if name == "fusion" else "transformers")
        assert "hf-finetune" in card.data.tags
    for name in ("as_is", "lora"):
        assert cells[name][:2] == ["–", "–"] and by_name[name]["status"] in cells[name][-1]
    assert by_name["head"]["trainable_parameters"] < by_name["full"]["trainable_parameters"]
    assert by_name["scratch"]["trainable_parameters"] == by_name["full"]["trainable_parameters"]
    assert json.loads((out / COMPARISON_JSON).read_text()) == json.loads(json.dumps(rows))
    assert "failed" in table and "skipped" in table
    for plot in (PLOT_PARAMS, PLOT_TIME):
        with Image.open(out / plot) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_scratch_trains_what_freeze_modules_protects_in_a_pretrained_checkpoint(tmp_path):
    """freeze_modules (here: BatchNorm, as recipes/compare.yaml sets it) keeps pretrained weights as they are;
    random weights have nothing to protect, so `scratch` trains everything, while `full` keeps the freeze."""
    from hf_finetune.commands.compare import METHODS, _method_arguments

    args = parse_compare_args(["--model_name_or_path", "a,b", "--freeze_modules", r"\.bn\d\.", "--output_dir",
                               str(tmp_path)])  # fmt: skip
    model_args, _, strategy_args, probe_args, _, training_args = args
    pick = {
        name: _method_arguments(METHODS[name], model_args, strategy_args, probe_args, training_args, tmp_path)
        for name in ("scratch", "full")
    }
    assert pick["scratch"][0].from_scratch and pick["scratch"][1].freeze_modules is None
    assert not pick["full"][0].from_scratch and pick["full"][1].freeze_modules == [r"\.bn\d\."]
    assert pick["scratch"][0].model_name_or_path == "a"


def test_as_is_evaluates_a_checkpoint_whose_labels_fit_without_training(tmp_path, data):
    fitting = build_tiny_checkpoint("vit", tmp_path / "fit", labels=LABELS)
    out = tmp_path / "cmp"
    rows = compare(*parse_compare_args(argv([fitting], out, ["as_is", "fusion"])), dataset=data)
    assert rows[0]["status"] == "ok" and not (out / "as_is" / "train_results.json").exists()
    assert "test_accuracy" in json.loads((out / "as_is" / "all_results.json").read_text())
    assert rows[1]["status"] == "skipped" and "several checkpoints" in rows[1]["reason"]


def test_unknown_method_is_a_clear_error():
    with pytest.raises(UserError, match=r"probe_svm.*did you mean `probe_mlp`.*probe_linear_svm"):
        parse_compare_args(["--model_name_or_path", "x", "--compare_methods", "probe_svm"])


def test_compare_run_again_with_one_more_method_keeps_the_first_results(tmp_path, data):
    vit = build_tiny_checkpoint("vit", tmp_path / "vit", labels=["a", "b", "c", "d"])
    out = tmp_path / "cmp"
    first = compare(
        *parse_compare_args(argv([vit], out, ["probe_logistic_regression", "head"])), dataset=data
    )
    kept_files = ("model.safetensors", "all_results.json", "trainer_state.json")
    before = {
        (name, file): (out / name / file).read_bytes()
        for name in ("probe_logistic_regression", "head")
        for file in kept_files
        if (out / name / file).is_file()
    }
    assert ("head", "trainer_state.json") in before

    methods = ["probe_logistic_regression", "head", "probe_gaussian_nb"]
    second = compare(*parse_compare_args(argv([vit], out, methods)), dataset=data)
    # The finished methods were neither trained again nor replaced; the new one ran; the table has all three.
    assert {key: (out / key[0] / key[1]).read_bytes() for key in before} == before
    assert [row["method"] for row in second] == methods
    assert [row.get("kept", False) for row in second] == [True, True, False]
    for old, new in zip(first, second[:2], strict=True):
        assert new["accuracy"] == old["accuracy"] and new["wall_time_s"] == old["wall_time_s"]
    assert json.loads((out / COMPARISON_JSON).read_text()) == json.loads(json.dumps(second))
    table = (out / COMPARISON_MD).read_text()
    assert table.count("kept from an earlier run |") == 2
    # A kept method's card shows the new table (all three methods), once: rendered again, not appended to.
    for name in methods:
        card = (out / name / "README.md").read_text()
        assert card.count("## Comparison with other ways to transfer") == 1
        assert table.split("\n\n")[0] in card

    # Only one method asked for: the table still holds the others' rows, which are still on disk.
    third = compare(*parse_compare_args(argv([vit], out, ["head"], "--learning_rate", "0.1")), dataset=data)
    assert [row["method"] for row in third] == methods
    head = third[1]
    assert head["kept"] and head["same_settings"] is False  # kept, and the table says its settings differ
    assert "kept from an earlier run with other settings" in (out / COMPARISON_MD).read_text()


def test_compare_with_overwrite_output_dir_runs_a_finished_method_again(tmp_path, data):
    vit = build_tiny_checkpoint("vit", tmp_path / "vit", labels=["a", "b", "c", "d"])
    out = tmp_path / "cmp"
    compare(*parse_compare_args(argv([vit], out, ["head", "probe_gaussian_nb"])), dataset=data)
    stamp = (out / "head" / "all_results.json").stat().st_mtime_ns
    # Without the table, a finished folder is still kept; its row comes from the folder's own results.
    expected = json.loads((out / "head" / "all_results.json").read_text())["test_accuracy"]
    (out / COMPARISON_JSON).unlink()
    (row,) = compare(*parse_compare_args(argv([vit], out, ["head"])), dataset=data)
    assert row["kept"] and row["same_settings"] is None and row["accuracy"] == expected
    assert "its settings were not recorded" in (out / COMPARISON_MD).read_text()
    assert (out / "head" / "all_results.json").stat().st_mtime_ns == stamp
    gaussian = (out / "probe_gaussian_nb" / "all_results.json").read_bytes()
    rows = compare(
        *parse_compare_args(argv([vit], out, ["head"], "--overwrite_output_dir", "true", "--seed", "7")),
        dataset=data,
    )
    assert (out / "head" / "all_results.json").stat().st_mtime_ns != stamp  # trained again
    assert "seed: 7" in (out / "head" / "resolved_config.yaml").read_text()
    assert [row["method"] for row in rows] == ["head"]  # the earlier table was removed above
    assert not rows[0].get("kept")
    assert (out / "probe_gaussian_nb" / "all_results.json").read_bytes() == gaussian  # not asked: untouched
