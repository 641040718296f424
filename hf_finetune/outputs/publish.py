"""Publishing a finished output directory to the Hugging Face Hub with `huggingface_hub`.

The upload happens once, from the finished directory, so what is published is exactly what was evaluated.
The token is looked up by huggingface_hub itself (HF_TOKEN or the `hf auth login` cache) unless one is passed
in; it is handed to `HfApi` and never written or logged.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

# Not published: intermediate Trainer checkpoints, hidden / temporary files, and the pickled TrainingArguments
# (a pickle is unsafe to load and can hold absolute paths of the training machine).
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/*",
    "*/.*",
    ".*",
    "runs/*",
    "*.tmp",
    "training_args.bin",
]


@dataclass
class PublishResult:
    repo_id: str
    files: list[str]
    url: str | None = None
    dry_run: bool = False


def files_to_upload(output_dir: str | os.PathLike) -> list[str]:
    """The relative paths `upload_folder` will send, filtered by the same patterns it is given."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(output_dir)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE_PATTERNS))


def retry_command(output_dir: str | os.PathLike, repo_id: str, private: bool | None) -> str:
    parts = ["hf-finetune", "push", str(output_dir), "--repo_id", repo_id]
    if private:
        parts.append("--private")
    return shlex.join(parts)


def publish(
    output_dir: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    dry_run: bool = False,
    api=None,
) -> PublishResult:
    """Create the model repository if needed and upload the output directory in one commit.

    `dry_run` lists the files and uploads nothing. A failed upload raises a `UserError` that says the local
    output is intact and gives the command to retry; nothing local is modified either way.
    """
    output_dir = Path(output_dir)
    if not (output_dir / "config.json").is_file() and not any(output_dir.glob("*.json")):
        raise UserError(f"{output_dir} does not look like a finished output directory (no config.json).")
    files = files_to_upload(output_dir)
    if dry_run:
        logger.debug("Dry run: would upload %d file(s) to %s: %s", len(files), repo_id, ", ".join(files))
        return PublishResult(repo_id, files, dry_run=True)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            repo_type="model",
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
            commit_message="Upload image classifier trained with hf-finetune",
        )
    except Exception as err:  # network, auth, quota: all leave the local directory as it was
        raise UserError(
            f"Uploading {output_dir} to the Hub repository `{repo_id}` failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}). The local output is intact. Check your "
            f"network and token (HF_TOKEN or `hf auth login`), then retry with: "
            f"{retry_command(output_dir, repo_id, private)}"
        ) from None
    logger.info("Published %d file(s) to %s", len(files), url)
    return PublishResult(repo_id, files, url=str(url))


def main(argv: list[str] | None = None) -> None:
    """`hf-finetune push OUTPUT_DIR --repo_id NAME [--private] [--dry_run]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="hf-finetune push", description="Upload a finished output directory to a Hub model repository."
    )
    parser.add_argument("output_dir")
    parser.add_argument("--repo_id", required=True, help="user/name of the model repository")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry_run", action="store_true", help="list the files that would be uploaded")
    args = parser.parse_args(argv)  # logging: configured by the command layer (errors.report_user_errors)
    result = publish(args.output_dir, args.repo_id, private=args.private or None, dry_run=args.dry_run)
    header = "Would upload" if result.dry_run else f"Uploaded to {result.url}:"
    sys.stdout.write(f"{header} {len(result.files)} file(s)\n" + "".join(f"  {f}\n" for f in result.files))
