"""The everyday path: recipes and their own YAML, user settings over project defaults, one strategy switch,
class ids, subsets, logging left alone, the Hub pre-flight against a real cache layout, version floors,
workers per process, compare's failures."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml

from hf_finetune.commands.cli import parse_train_args, recipe_config
from hf_finetune.config import DataArguments, default_dataloader_workers
from hf_finetune.errors import UserError

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# 1. A recipe reads the YAML beside it
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.py")), ids=lambda p: p.name)
def test_recipe_without_config_reads_its_own_yaml_from_any_directory(recipe, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.chdir(tmp_path)  # resolved beside the script, not against the working directory
    values = yaml.safe_load(recipe.with_suffix(".yaml").read_text())
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe.stem}", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert recipe_config(module.__file__) == str(recipe.with_suffix(".yaml"))
    parsed = _parser_of(recipe.stem)([], default_config=recipe_config(module.__file__))
    assert parsed[0].model_name_or_path == values["model_name_or_path"]
    training_args = next(part for part in parsed if hasattr(part, "output_dir"))
    assert training_args.output_dir == values["output_dir"]
    # --config replaces it, and a flag overrides either.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**values, "output_dir": "elsewhere", "seed": 7}))
    parsed = _parser_of(recipe.stem)(
        ["--config", str(other), "--seed", "8"], default_config=recipe_config(module.__file__)
    )
    training_args = next(part for part in parsed if hasattr(part, "output_dir"))
    assert training_args.output_dir == "elsewhere" and training_args.seed == 8


def _parser_of(name: str):
    if name == "compare":
        from hf_finetune.commands.compare import parse_compare_args

        return lambda argv, **kw: parse_compare_args([*argv, "--bf16", "false"], **kw)
    if name == "probe":
        from hf_finetune.probe.arguments import parse_probe_args

        return parse_probe_args
    # flowers.yaml asks for bf16, a GPU setting: the rest must parse on a CPU
    return lambda argv, **kw: parse_train_args([*argv, "--bf16", "false"], **kw)


# ---------------------------------------------------------------------------------------------------------
# 5. Project defaults give way to what the user set
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "expected", "dropped"),
    [
        ([], {"load_best_model_at_end": True, "save_strategy": "epoch"}, None),
        (["--save_strategy", "no"], {"load_best_model_at_end": False, "eval_strategy": "epoch"}, "save_strategy=no"),
        (["--eval_strategy", "no"], {"load_best_model_at_end": False, "save_strategy": "epoch"}, "eval_strategy=no"),
        (["--eval_strategy", "steps", "--eval_steps", "5"],
         {"save_strategy": "steps", "save_steps": 5, "load_best_model_at_end": True}, "save_strategy"),
        (["--logging_steps", "3"], {"logging_strategy": "steps", "logging_steps": 3}, "logging_strategy"),
        (["--save_steps", "4"], {"save_strategy": "steps", "eval_strategy": "steps", "eval_steps": 4}, "eval_strategy"),
    ],
)  # fmt: skip
def test_project_defaults_give_way_to_user_settings(flags, expected, dropped, caplog):
    caplog.set_level(logging.INFO, logger="hf_finetune")
    training_args = parse_train_args(["--model_name_or_path", "x", *flags])[3]
    for key, value in expected.items():
        actual = getattr(training_args, key)
        assert getattr(actual, "value", actual) == value, key
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Settings:")]
    if dropped is None:
        assert notes == []
    else:
        assert any("default" in n and dropped in n for n in notes), notes


def test_the_same_settings_from_yaml_count_as_the_users(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: x\nsave_strategy: 'no'\n")
    assert parse_train_args(["--config", str(config)])[3].load_best_model_at_end is False


def test_a_contradiction_between_two_user_settings_is_reported_not_resolved():
    with pytest.raises(UserError, match="load_best_model_at_end"):
        parse_train_args(
            ["--model_name_or_path", "x", "--save_strategy", "no", "--load_best_model_at_end", "true"]
        )
    with pytest.raises(UserError, match="early_stopping_patience"):
        parse_train_args(
            ["--model_name_or_path", "x", "--eval_strategy", "no", "--early_stopping_patience", "2"]
        )


def test_bf16_without_a_gpu_names_the_fix():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="--bf16 false"):
        parse_train_args(["--model_name_or_path", "x", "--bf16", "true"])


# ---------------------------------------------------------------------------------------------------------
# 10. Dataloader workers: this process's share of the spare cores
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cores", "local", "workers"), [(16, 1, 8), (16, 8, 1), (16, 4, 3), (2, 1, 1), (2, 2, 0)]
)
def test_default_workers_share_the_cores_among_local_processes(monkeypatch, cores, local, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert default_dataloader_workers() == workers


# ---------------------------------------------------------------------------------------------------------
# 3. Class ids become the right names; 4. subsets are stratified
# ---------------------------------------------------------------------------------------------------------
def _with_labels(values, dtype):
    from datasets import Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    images = [PILImage.new("RGB", (8, 8), (i * 20 % 255, 0, 0)) for i in range(len(values))]
    features = Features({"image": Image(), "label": Value(dtype)})
    return DatasetDict({"train": Dataset.from_dict({"image": images, "label": values}, features=features)})


@pytest.mark.parametrize(
    ("values", "dtype", "names"),
    [
        ([1, 2, 3, 1, 2, 3, 3], "int64", ["1", "2", "3"]),
        ([3, 7, 12, 12, 3], "int32", ["3", "7", "12"]),
        ([-1, 0, 5, -1], "int64", ["-1", "0", "5"]),
        (["1", "2", "10", "10", "2"], "string", ["1", "2", "10"]),
        (["cat", "dog", "cat"], "string", ["cat", "dog"]),
    ],
)
def test_class_ids_map_to_their_own_names(values, dtype, names):
    from hf_finetune.data.labels import encode_labels

    encoded = encode_labels(_with_labels(values, dtype), "label", "test data")["train"]
    feature = encoded.features["label"]
    assert feature.names == names
    assert [feature.int2str(v) for v in encoded["label"]] == [str(v) for v in values]


def test_one_class_id_written_two_ways_is_an_error():
    from hf_finetune.data.labels import encode_labels

    with pytest.raises(UserError, match="same class id"):
        encode_labels(_with_labels(["1", "01", "2"], "string"), "label", "test data")


def test_max_samples_are_stratified_and_seeded():
    from conftest import digits_dataset
    from datasets import DatasetDict

    from hf_finetune.data.splits import make_splits

    # Rows sorted by class, as an image folder lists them: the first N rows would hold only the first classes.
    data = DatasetDict(
        {"train": digits_dataset(30, classes=(0, 1, 2)), "test": digits_dataset(20, classes=(0, 1, 2))}
    )
    args = DataArguments(max_train_samples=15, max_eval_samples=9, train_val_split=0.2)
    splits, report = make_splits(data, args, "label", seed=0)
    assert Counter(splits["train"]["label"]) == {0: 5, 1: 5, 2: 5}
    assert Counter(splits["test"]["label"]) == {0: 3, 1: 3, 2: 3}
    assert Counter(splits["validation"]["label"]) == {0: 3, 1: 3, 2: 3}
    assert report["train"]["subset"] == "15 of 72 (stratified)"
    again, _ = make_splits(data, args, "label", seed=0)
    other, _ = make_splits(data, args, "label", seed=1)
    assert again["train"]["image"] == splits["train"]["image"]
    assert other["train"]["image"] != splits["train"]["image"]


def test_integer_labels_from_csv_end_to_end_with_probe(tmp_path, small_digits_folder, tiny_vit):
    """Class ids 1..3 in CSV files (as Flowers-102 numbers its classes), through `training.run` with
    `strategy: probe`: names, per-row labels and per-class support in the report are the files' own."""
    from hf_finetune.config import FinetuneTrainingArguments, ModelArguments
    from hf_finetune.strategies.arguments import StrategyArguments
    from hf_finetune.train.run import run

    ids = {"zero": 1, "one": 2, "two": 3}
    counts = {"train": {"zero": 30, "one": 20, "two": 25}, "test": {"zero": 4, "one": 7, "two": 9}}
    files = {}
    for split, wanted in counts.items():
        rows = ["path,label"]
        for cls, n in wanted.items():
            pictures = sorted((small_digits_folder / cls).iterdir())
            pictures = pictures[:n] if split == "train" else pictures[-n:]
            rows += [f"{p},{ids[cls]}" for p in pictures]
        files[split] = tmp_path / f"{split}.csv"
        files[split].write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    results = run(
        ModelArguments(model_name_or_path=str(tiny_vit)),
        DataArguments(train_file=str(files["train"]), test_file=str(files["test"]), train_val_split=0.2),
        FinetuneTrainingArguments(output_dir=str(out), use_cpu=True, report_to="none"),
        strategy_args=StrategyArguments(strategy="probe"),  # the notebook way: one switch, also probe
    )
    assert results["test_samples"] == 20
    assert json.loads((out / "data_splits.json").read_text())["labels"] == ["1", "2", "3"]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "1", "1": "2", "2": "3"}
    report = json.loads((out / "classification_report.json").read_text())
    assert {name: int(report[name]["support"]) for name in ("1", "2", "3")} == {"1": 4, "2": 7, "3": 9}
    assert json.loads((out / "run_summary.json").read_text())["strategy"].startswith("probe")


# ---------------------------------------------------------------------------------------------------------
# 6. One strategy switch
# ---------------------------------------------------------------------------------------------------------
def test_strategy_probe_parses_in_every_entry_point(tmp_path):
    from hf_finetune.commands.compare import parse_compare_args
    from hf_finetune.probe.arguments import ProbeArguments
    from hf_finetune.strategies.arguments import StrategyArguments

    parsed = parse_train_args(["--model_name_or_path", "x", "--strategy", "probe", "--classifier", "knn"])
    assert isinstance(parsed[2], ProbeArguments) and parsed[2].classifier == "knn"
    flowers = parse_train_args(
        ["--strategy", "probe", "--bf16", "false"], default_config=recipe_config(REPO / "recipes/flowers.py")
    )
    assert flowers[2].strategy == "probe"
    assert StrategyArguments(strategy="probe").strategy == "probe"
    compare_args = parse_compare_args(
        ["--config", str(REPO / "recipes/probe.yaml"), "--compare_methods", "head"]
    )
    assert compare_args[2].strategy == "probe"
    with pytest.raises(UserError, match="probe"):
        StrategyArguments(strategy="prob")


# ---------------------------------------------------------------------------------------------------------
# 7. The library leaves logging alone; 11. compare ends on SystemExit
# ---------------------------------------------------------------------------------------------------------
def test_library_entry_points_leave_logging_alone(tmp_path, tiny_vit):
    from conftest import digits_dataset

    from hf_finetune.commands.compare import compare, parse_compare_args

    root = logging.getLogger()
    marker = logging.NullHandler()
    root.addHandler(marker)
    before = (list(root.handlers), root.level, logging.getLogger("hf_finetune").level)
    try:
        argv = ["--model_name_or_path", str(tiny_vit), "--output_dir", str(tmp_path / "c"), "--use_cpu", "true",
                "--compare_methods", "probe_logistic_regression", "--feature_cache_dir", str(tmp_path / "f")]  # fmt: skip
        rows = compare(*parse_compare_args(argv), dataset=digits_dataset(12))
        assert rows[0]["status"] == "ok"
        assert (list(root.handlers), root.level, logging.getLogger("hf_finetune").level) == before
    finally:
        root.removeHandler(marker)


def test_compare_ends_on_system_exit_but_keeps_ordinary_failures_as_rows(tmp_path, tiny_vit, monkeypatch):
    from conftest import digits_dataset

    from hf_finetune.commands import compare as compare_module

    argv = ["--model_name_or_path", str(tiny_vit), "--output_dir", str(tmp_path / "c"), "--use_cpu", "true",
            "--compare_methods", "head", "full"]  # fmt: skip

    def failing(method, args, out, dataset=None):
        raise RuntimeError(f"{method.name} broke")

    monkeypatch.setattr(compare_module, "run_method", failing)
    rows = compare_module.compare(*compare_module.parse_compare_args(argv), dataset=digits_dataset(6))
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("failed", "RuntimeError: head broke"),
        ("failed", "RuntimeError: full broke"),
    ]

    def exiting(method, args, out, dataset=None):
        raise SystemExit(2)

    monkeypatch.setattr(compare_module, "run_method", exiting)
    with pytest.raises(SystemExit):
        compare_module.compare(*compare_module.parse_compare_args(argv), dataset=digits_dataset(6))


# ---------------------------------------------------------------------------------------------------------
# 8. Hub pre-flight: what would load, in the cache the run uses
# ---------------------------------------------------------------------------------------------------------
def _hub_cache_with(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> None:
    """Lay `folder` out as huggingface_hub lays out a download: blobs, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in folder.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


def test_hub_preflight_loads_what_is_cached_and_refuses_what_is_not(tmp_path, tiny_vit, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoImageProcessor

    from hf_finetune import hub
    from hf_finetune.config import ModelArguments
    from hf_finetune.models.loading import load_config, load_image_processor

    cache = tmp_path / "hub"
    _hub_cache_with(cache, "someone/tiny-vit", tiny_vit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.offline("model")
    model_args = ModelArguments(model_name_or_path="someone/tiny-vit", cache_dir=str(cache))
    assert load_config(model_args).model_type == "vit"
    assert (
        load_image_processor(model_args).to_dict() == AutoImageProcessor.from_pretrained(tiny_vit).to_dict()
    )
    # Not in this cache dir (nor in the default one): the one-paragraph message, before any library call.
    with pytest.raises(UserError, match="not in the local cache") as err:
        load_config(ModelArguments(model_name_or_path="someone/other-vit", cache_dir=str(cache)))
    assert "someone/other-vit" in str(err.value) and "\n" not in str(err.value)
    # A path that is neither a folder nor a Hub id: the message, not the validator's traceback.
    with pytest.raises(UserError, match="Hub id") as err:
        load_config(ModelArguments(model_name_or_path="no_such_dir/sub/model", cache_dir=str(cache)))
    assert "no_such_dir/sub/model" in str(err.value)
    # A config without weights would not load: not cached.
    (cache / "models--someone--tiny-vit" / "snapshots" / ("0" * 40) / "model.safetensors").unlink()
    assert not hub.model_is_cached("someone/tiny-vit", "main", str(cache))
    # The switch is the library's: HF_HUB_OFFLINE=off is "online" for huggingface_hub, and so here.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub.offline("model")


def test_dataset_preflight_uses_what_datasets_finds_in_its_cache(tmp_path, monkeypatch):
    import datasets.config

    from hf_finetune import hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert hub.offline("dataset")
    # A dataset prepared into the cache dir, where `load_dataset` itself looks offline.
    cache = tmp_path / "datasets"
    prepared = cache / "someone___digits" / "default" / "0.0.0" / ("1" * 16)
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text(json.dumps({"config_name": "default"}))
    assert hub.dataset_is_cached("someone/digits", None, str(cache))
    assert not hub.dataset_is_cached("someone/other", None, str(cache))
    with pytest.raises(UserError, match="someone/other"):
        hub.check_hub_repo(
            "someone/other", None, "dataset", "dataset_name", "use local files.", cache_dir=str(cache)
        )


# ---------------------------------------------------------------------------------------------------------
# 9. Version floors are true of what is installed
# ---------------------------------------------------------------------------------------------------------
def test_installed_versions_satisfy_the_declared_floors():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        assert requirement.specifier.contains(version(requirement.name), prereleases=True), line
    floors = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    # What the code needs: `dtype=` in from_pretrained (4.56) and `warmup_steps` as a fraction (5.0).
    assert not floors["transformers"].specifier.contains("4.56.0")
    assert floors["transformers"].specifier.contains("5.0.0")
