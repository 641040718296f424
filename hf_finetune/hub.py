"""Hub reachability, checked once up front so a missing network or a wrong id fails in a second, not after
the retry back-off of a download (which takes half a minute with no network)."""

from __future__ import annotations

import os

from hf_finetune.errors import UserError

HUB_CHECK_TIMEOUT_S = 10.0


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def check_hub_repo(repo_id: str, revision: str | None, repo_type: str, setting: str, local_hint: str) -> None:
    """Raise a clear `UserError` when `repo_id` is neither a local path, nor cached, nor reachable on the Hub.

    `setting` is the config key the user wrote it under; `local_hint` says how to use local files instead.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if os.path.exists(repo_id) or offline():
        return  # local folder, or offline mode where the libraries' own cache lookup gives the answer
    marker = "config.json" if repo_type == "model" else "README.md"
    if isinstance(try_to_load_from_cache(repo_id, marker, revision=revision, repo_type=repo_type), str):
        return
    kind = "checkpoint" if repo_type == "model" else "dataset"
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
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. It is not in the local cache "
            f"either. Connect to the network, or {local_hint}"
        ) from None
