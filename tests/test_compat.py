"""Each workaround in ``hf_finetune.compat`` is still needed and still works on the installed versions."""

from __future__ import annotations

# --- argparse ---------------------------------------------------------------------------------------------


def test_option_destinations_reads_argparse_option_map():
    """`compat.option_destinations` uses argparse's private `_option_string_actions`: this fails once argparse
    renames it or stops keeping every option string of an HfArgumentParser in it."""
    from dataclasses import dataclass

    from transformers import HfArgumentParser

    from hf_finetune.compat import option_destinations

    @dataclass
    class Settings:
        name: str | None = None
        count: int = 1
        flag: bool = True  # HfArgumentParser adds --no_flag for it

    parser = HfArgumentParser([Settings])
    assert isinstance(parser._option_string_actions, dict)
    argv = ["--name", "x", "--no_flag", "--count=3", "--other", "1", "value"]
    assert option_destinations(parser, argv) == {"name", "flag", "count"}
    assert option_destinations(parser, ["--count", "2"]) == {"count"}
    assert option_destinations(parser, None) == set()


# --- torch ------------------------------------------------------------------------------------------------

# --- transformers -----------------------------------------------------------------------------------------

# --- accelerate -------------------------------------------------------------------------------------------

# --- huggingface_hub --------------------------------------------------------------------------------------

# --- datasets ---------------------------------------------------------------------------------------------


def test_datasets_cache_lookup_is_still_the_private_one_load_dataset_uses(tmp_path):
    """`compat.dataset_in_cache` calls datasets' private `_find_hash_in_cache` positionally: this fails when
    datasets renames, moves or re-orders it (then update or delete the workaround)."""
    import inspect
    import json

    from datasets.packaged_modules.cache import cache as cached_module

    from hf_finetune.compat import dataset_in_cache

    parameters = list(inspect.signature(cached_module._find_hash_in_cache).parameters)
    assert parameters == ["dataset_name", "config_name", "cache_dir", "config_kwargs", "custom_features"]
    # The offline fallback of load_dataset is the module that uses it.
    assert "_find_hash_in_cache" in inspect.getsource(cached_module.Cache)
    prepared = tmp_path / "someone___digits" / "default" / "0.0.0" / ("1" * 16)
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text(json.dumps({"config_name": "default"}))
    assert dataset_in_cache("someone/digits", None, str(tmp_path)) is True
    assert dataset_in_cache("someone/digits", "other", str(tmp_path)) is False
    assert dataset_in_cache("someone/other", None, str(tmp_path)) is False


def test_dataset_fingerprint():
    import datasets

    from hf_finetune.compat import dataset_fingerprint

    # Still private: when a public accessor appears, use it in compat.dataset_fingerprint instead.
    assert not hasattr(datasets.Dataset, "fingerprint")
    table = {"x": list(range(10)), "label": [i % 2 for i in range(10)]}
    one, same = datasets.Dataset.from_dict(table), datasets.Dataset.from_dict(table)
    assert isinstance(dataset_fingerprint(one), str) and dataset_fingerprint(one) == dataset_fingerprint(same)
    # Every step that can change the rows changes it; repeating the same step gives the same value.
    fingerprints = {
        dataset_fingerprint(one),
        dataset_fingerprint(one.select(range(5))),
        dataset_fingerprint(one.shuffle(seed=0)),
        dataset_fingerprint(one.shuffle(seed=1)),
        dataset_fingerprint(datasets.Dataset.from_dict({**table, "x": list(range(1, 11))})),
    }
    assert len(fingerprints) == 5
    assert dataset_fingerprint(one.shuffle(seed=0)) == dataset_fingerprint(same.shuffle(seed=0))
