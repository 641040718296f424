"""Ordinary inputs that used to give silent wrong results or lose data: overwriting an output folder, nested class
folders, an output folder inside the data, splits that share pictures, near-duplicate labels, 16-bit pictures,
mistyped or repeated settings, and local paths in published files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import run_training

from hf_finetune.errors import UserError


def checksums(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones included) with the SHA-256 of its contents."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def quick_argv(checkpoint, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--max_steps", "1",
            "--use_cpu", "true", "--dataloader_num_workers", "0", "--train_val_split", "0.25",
            "--per_device_train_batch_size", "8", *map(str, extra)]  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# 1. overwrite_output_dir removes nothing before the run starts, and only what a run wrote
# --------------------------------------------------------------------------------------------------------
def test_a_failing_overwrite_leaves_a_users_folder_exactly_as_it_was(tmp_path, small_digits_folder):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    before = checksums(folder)
    argv = ["--train_dir", small_digits_folder, "--overwrite_output_dir", "true"]
    with pytest.raises(UserError, match="no_such_model"):
        run_training(quick_argv(tmp_path / "no_such_model", folder, *argv))
    assert checksums(folder) == before

    (folder / "README.md").write_text("# My own project\n")
    before = checksums(folder)
    with pytest.raises(UserError, match=r"README.md that hf-finetune did not write"):
        run_training(quick_argv(tmp_path / "no_such_model", folder, *argv))
    assert checksums(folder) == before


def test_a_failing_overwrite_leaves_a_finished_run_exactly_as_it_was(
    tmp_path, small_digits_folder, tiny_vit, capsys
):
    out = tmp_path / "run"
    run_training(quick_argv(tiny_vit, out, "--train_dir", small_digits_folder))
    manifest = json.loads((out / ".hf_finetune_manifest.json").read_text())
    assert manifest["complete"] and {
        "README.md",
        "all_results.json",
        "model.safetensors",
        "checkpoint-1",
    } <= set(manifest["entries"])
    before = checksums(out)
    with pytest.raises(UserError, match="no_such_pictures"):
        run_training(quick_argv(tiny_vit, out, "--train_dir", tmp_path / "no_such_pictures",
                                "--overwrite_output_dir", "true"))  # fmt: skip
    assert checksums(out) == before

    # A run that starts replaces what the previous run wrote, says so, and keeps the user's own file.
    (out / "my_notes.txt").write_text("keep me\n")
    capsys.readouterr()
    run_training(quick_argv(tiny_vit, out, "--train_dir", small_digits_folder, "--overwrite_output_dir", "true",
                            "--seed", "5"))  # fmt: skip
    log = capsys.readouterr().out  # the run's own log handler writes to stdout
    assert "replaced the previous run" in log and "checkpoint-1, config.json" in log
    assert (out / "my_notes.txt").read_text() == "keep me\n"
    assert "Resuming from" not in log  # the old run's checkpoint was removed, not resumed from
    after = checksums(out)
    for name in ("model.safetensors", "checkpoint-1/model.safetensors"):
        assert after[name] != before[name]
    assert "my_notes.txt" not in json.loads((out / ".hf_finetune_manifest.json").read_text())["entries"]
