"""Ordinary inputs that used to give silent wrong results or lose data: overwriting an output folder, nested class
folders, an output folder inside the data, splits that share pictures, near-duplicate labels, 16-bit pictures,
mistyped or repeated settings, and local paths in published files."""

from __future__ import annotations

import hashlib
import json
import re
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


# --------------------------------------------------------------------------------------------------------
# 8. every setting's type is checked while parsing; 9. a key given twice is an error
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("learning_rate: null", "Setting `learning_rate` in config file .* is null .* must be a number"),
        (
            "train_dir: [a, b]",
            r"Setting `train_dir` .* is \['a', 'b'\] \(a list\), but it must be a text or null",
        ),
        ("max_train_samples: 10.5", r"`max_train_samples` .* is 10.5 \(a float\), but it must be an integer"),
        ("augment: maybe", "`augment` .* is 'maybe', but it must be true/false"),
        ("c_values: [0.1, high]", r"`c_values` .* must be a list of a number"),
        (
            "output_dir: a\nlearning_rate: 0.1\noutput_dir: b",
            "`output_dir` is given twice .* on line 3 and on line 5",
        ),
    ],
)
def test_a_bad_yaml_value_is_one_message_before_any_work(
    tmp_path, small_digits_folder, capsys, line, expected
):
    from hf_finetune.cli import main

    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    source = "" if line.startswith("train_dir") else f"train_dir: {small_digits_folder}\n"
    config.write_text(f"model_name_or_path: no_such_model\n{source}{line}\n")
    command = "probe" if "c_values" in line else "train"
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(config), "--output_dir", str(out)])
    assert exit_info.value.code == 2
    assert re.search(expected, " ".join(capsys.readouterr().err.split()))
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        (
            "--max_train_samples",
            "10.5",
            "`max_train_samples` on the command line is '10.5', but it must be an integer",
        ),
        ("--learning_rate", "fast", "`learning_rate` on the command line is 'fast', but it must be a number"),
    ],
)
def test_a_bad_command_line_value_gets_the_same_message(tmp_path, capsys, flag, value, expected):
    from hf_finetune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert expected in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path):
    from hf_finetune.cli import parse_train_args

    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\nlearning_rate: 1e-4\nmax_train_samples: '12'\n")
    _, data_args, _, training_args = parse_train_args(["--config", str(config)])
    assert training_args.learning_rate == 1e-4 and data_args.max_train_samples == 12
