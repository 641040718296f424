"""Publishing: exactly the finished files go up, a dry run lists them, a failure keeps everything local."""

from __future__ import annotations

import pytest

from hf_finetune.errors import UserError
from hf_finetune.outputs.card import CARD_DATA
from hf_finetune.outputs.manifest import MANIFEST
from hf_finetune.outputs.publish import files_to_upload, publish


class RecordingHubApi:
    """Stand-in for `huggingface_hub.HfApi`: records what would have been sent."""

    def __init__(self, fail_upload: bool = False):
        self.calls = []
        self.fail_upload = fail_upload

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, ignore_patterns=None, commit_message=None):
        if self.fail_upload:
            raise ConnectionError("connection reset by peer")
        from pathlib import Path

        from huggingface_hub.utils import filter_repo_objects

        root = Path(folder_path)
        sent = sorted(
            filter_repo_objects(
                [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()],
                ignore_patterns=ignore_patterns,
            )
        )
        self.calls.append(("upload_folder", repo_id, sent))


@pytest.fixture
def output_dir(tmp_path):
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                 "all_results.json", "confusion_matrix.png", "training_args.bin", ".lock", MANIFEST, CARD_DATA,
                 "checkpoint-10/model.safetensors", "checkpoint-10/trainer_state.json"):  # fmt: skip
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    return out


EXPECTED = [
    "README.md",
    "all_results.json",
    "config.json",
    "confusion_matrix.png",
    "model.safetensors",
    "preprocessor_config.json",
]


def test_files_to_upload_leave_out_checkpoints_pickles_and_hidden_files(output_dir):
    # Hidden files include the run manifest and the card content: what a run keeps for itself.
    assert files_to_upload(output_dir) == EXPECTED


def test_publish_creates_repo_and_uploads_the_directory(output_dir):
    api = RecordingHubApi()
    result = publish(output_dir, "me/flowers", private=True, api=api)
    assert api.calls[0] == ("create_repo", "me/flowers", True, True, "model")
    assert api.calls[1] == ("upload_folder", "me/flowers", EXPECTED)
    assert result.files == EXPECTED and result.url.endswith("me/flowers")


def test_dry_run_lists_and_sends_nothing(output_dir):
    api = RecordingHubApi()
    result = publish(output_dir, "me/flowers", dry_run=True, api=api)
    assert result.dry_run and result.files == EXPECTED and api.calls == []


def test_failed_upload_keeps_local_output_and_gives_the_retry_command(output_dir):
    before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as err:
        publish(output_dir, "me/flowers", private=True, api=RecordingHubApi(fail_upload=True))
    message = str(err.value)
    assert "local output is intact" in message
    assert f"hf-finetune push {output_dir} --repo_id me/flowers --private" in message
    assert {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before
