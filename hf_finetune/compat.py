"""Every use of a private name of an upstream library, in one place.

Each entry says which versions it was checked on and why the public API does not do the job, and has a test
in ``tests/test_compat.py`` that fails once upstream changes the name or fixes the problem, so that the
workaround can be deleted instead of silently rotting. Nothing else in ``hf_finetune`` touches an upstream
name that starts with an underscore.
"""

from __future__ import annotations

# --- argparse ---------------------------------------------------------------------------------------------

# --- torch ------------------------------------------------------------------------------------------------

# --- transformers -----------------------------------------------------------------------------------------

# --- accelerate -------------------------------------------------------------------------------------------

# --- huggingface_hub --------------------------------------------------------------------------------------

# --- datasets ---------------------------------------------------------------------------------------------


def dataset_in_cache(dataset_name: str, config_name: str | None, cache_dir: str | None) -> bool | None:
    """Whether `datasets.load_dataset(dataset_name, config_name)` finds a prepared copy with no network.

    Checked on datasets 5.2. Offline, `load_dataset` falls back to its cached-dataset module, which finds the
    copy with the private `datasets.packaged_modules.cache.cache._find_hash_in_cache`; datasets has no public
    "is it cached" call (only loading answers, after its retry back-off), so the same lookup is used here and
    "cached" means exactly what would load. Returns None when this datasets release has no such function (the
    caller then lets `load_dataset` give the answer). Can go once datasets offers a public lookup.
    """
    try:
        from datasets.packaged_modules.cache.cache import _find_hash_in_cache
    except ImportError:
        return None
    try:
        _find_hash_in_cache(dataset_name, config_name, cache_dir, {}, None)
    except (ValueError, OSError, KeyError):  # ValueError: "Couldn't find cache for ..."
        return False
    return True
