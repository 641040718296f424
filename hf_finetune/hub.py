"""Hub reachability, checked once up front so a missing network or a wrong id fails in a second, not after
the retry back-off of a download (which takes half a minute with no network).

"Cached" means what the loading library itself would load with no network: for a checkpoint, its config and
weights in the huggingface_hub cache (`cache_dir` or the default one); for a dataset, a prepared copy in the
`datasets` cache. The offline switch is the libraries' own (`huggingface_hub.constants.HF_HUB_OFFLINE`,
`datasets.config.HF_HUB_OFFLINE`), so HF_HUB_OFFLINE / HF_DATASETS_OFFLINE mean here what they mean there.
"""

from __future__ import annotations

import logging
import os
import re

from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

HUB_CHECK_TIMEOUT_S = 10.0

# A checkpoint loads from the cache when its config and one form of its weights are there.
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def offline(repo_type: str = "model") -> bool:
    """Whether the library that loads `repo_type` is in offline mode."""
    if repo_type == "dataset":
        import datasets.config

        return bool(datasets.config.HF_HUB_OFFLINE)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def model_is_cached(repo_id: str, revision: str | None, cache_dir: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        return isinstance(found, str) and os.path.isfile(found)

    return cached("config.json") and any(cached(name) for name in MODEL_WEIGHT_FILES)


def dataset_is_cached(repo_id: str, config_name: str | None, cache_dir: str | None = None) -> bool:
    """Whether `datasets.load_dataset` finds a prepared copy of the dataset with no network (the lookup its
    offline fallback makes, see `compat.dataset_in_cache`; when that lookup is unavailable, load_dataset
    itself gives the answer)."""
    from hf_finetune.compat import dataset_in_cache

    found = dataset_in_cache(repo_id, config_name, cache_dir)
    return True if found is None else found


def check_hub_repo(
    repo_id: str,
    revision: str | None,
    repo_type: str,
    setting: str,
    local_hint: str,
    cache_dir: str | None = None,
    config_name: str | None = None,
) -> None:
    """Raise a clear `UserError` when `repo_id` is neither a local path, nor cached, nor reachable on the Hub.

    `setting` is the config key the user wrote it under; `local_hint` says how to use local files instead;
    `cache_dir` is the cache the loading call will use (None: the library's default); `config_name` is a
    dataset's configuration.
    """
    if os.path.exists(repo_id):
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:  # e.g. `./no_such_model`: a path, and no Hub id can look like it
        kind = "checkpoint" if repo_type == "model" else "dataset"
        raise UserError(
            f"{setting}={repo_id} does not exist: there is no such local folder, and it is not a Hub id "
            f"(user/name) either. Check the path, or {local_hint}"
        ) from None
    if repo_type == "model" and model_is_cached(repo_id, revision, cache_dir):
        return
    if repo_type == "dataset" and dataset_is_cached(repo_id, config_name, cache_dir):
        return
    kind = "checkpoint" if repo_type == "model" else "dataset"
    where = f" ({cache_dir})" if cache_dir else ""
    if offline(repo_type):
        raise UserError(
            f"The {kind} `{repo_id}` ({setting}) is not in the local cache{where}, and offline mode is on "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so it cannot be downloaded. Run once with the network and "
            f"offline mode off to cache it, or {local_hint}"
        )

    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type, timeout=HUB_CHECK_TIMEOUT_S)
    except GatedRepoError:
        raise UserError(
            f"The {kind} `{repo_id}` ({setting}) is gated: accept its terms on huggingface.co and log in with "
            "`hf auth login` (or set HF_TOKEN), then run again."
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"The {kind} `{repo_id}` ({setting}) has no revision `{revision}`. Use an existing branch, tag or "
            "commit."
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"There is no {kind} `{repo_id}` on the Hub ({setting}), or it is private and you are not logged in. "
            f"Check the id, or {local_hint}"
        ) from None
    except Exception as err:  # connection refused, DNS failure, timeout, proxy error: all "no network"
        raise UserError(
            f"Could not reach the Hugging Face Hub to fetch the {kind} `{repo_id}` ({setting}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. It is not in the local cache"
            f"{where} either. Connect to the network, or {local_hint}"
        ) from None


# A Hub repository id as written in a setting: `org/name` (letters, digits, `-`, `_`, `.`).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_hub_id(name: str | None) -> bool:
    """True when `name` names a Hub repository rather than a folder of this machine (it is not a path that
    exists, nor an absolute one): what a model card may name as its base model or dataset."""
    return bool(name) and not os.path.exists(name) and not os.path.isabs(name)


def looks_like_hub_id(name: str) -> bool:
    """True when `name` reads as a Hub id (`org/name`, relative, without `./`): a local folder of that name
    would be loaded in its place by transformers and datasets, which try the local path first."""
    return bool(_HUB_ID.match(name)) and not name.startswith(("./", "../"))


def warn_if_local_shadows(name: str, setting: str) -> None:
    """Say so when a local folder stands where a Hub id was meant: it is what will load, not the Hub repo."""
    if looks_like_hub_id(name) and os.path.exists(name):
        logger.warning(
            "%s=%s names a Hub repository, but a local folder ./%s exists in the working directory and is what "
            "loads instead. Write ./%s to mean the folder (and silence this), or move it away to use the Hub's.",
            setting,
            name,
            name,
            name,
        )
