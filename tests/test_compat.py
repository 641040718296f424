"""Each workaround in ``hf_finetune.compat`` is still needed and still works on the installed versions."""

from __future__ import annotations

# --- argparse ---------------------------------------------------------------------------------------------

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
