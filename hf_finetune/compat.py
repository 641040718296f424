"""Every use of a private name of an upstream library, in one place.

Each entry says which versions it was checked on and why the public API does not do the job, and has a test
in ``tests/test_compat.py`` that fails once upstream changes the name or fixes the problem, so that the
workaround can be deleted instead of silently rotting. Nothing else in ``hf_finetune`` touches an upstream
name that starts with an underscore.
"""

from __future__ import annotations

# --- argparse ---------------------------------------------------------------------------------------------


def option_destinations(parser, argv) -> set[str]:
    """The `dest` of every option in `argv` that `parser` knows (`--flag value` and `--flag=value`; the
    `--no_x` flag that `HfArgumentParser` adds for a boolean `x` defaulting to True gives `x`): the settings a
    command line sets, before it is parsed.

    Private: `ArgumentParser._option_string_actions`, the option string -> action map that argparse itself
    parses with. argparse has no public lookup of an option string, and `HfArgumentParser` adds its options
    through the public `add_argument`, so they are all in that map. Checked on Python 3.11.7 with
    transformers 5.24 (`HfArgumentParser`); `tests/test_compat.py` fails if the map goes or changes shape.
    """
    actions = parser._option_string_actions
    return {
        action.dest
        for arg in argv or ()
        if arg.startswith("--") and (action := actions.get(arg.split("=", 1)[0])) is not None
    }


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


def dataset_fingerprint(dataset) -> str:
    """The fingerprint `datasets` keeps for a Dataset: a hash of how it was made (source files, every
    transform, select and shuffle since), updated by `datasets` itself at each step, so it changes whenever
    the rows could. The feature cache keys entries by it (`probe/cache.py`).

    Private: `Dataset._fingerprint` has no public accessor (checked on datasets 5.2.0); hashing the rows
    ourselves would read every image. `test_dataset_fingerprint` fails once a public `fingerprint` appears.
    """
    return dataset._fingerprint
