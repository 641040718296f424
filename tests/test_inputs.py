"""Ordinary inputs that used to give silent wrong results or lose data: overwriting an output folder, nested class
folders, an output folder inside the data, splits that share pictures, near-duplicate labels, 16-bit pictures,
mistyped or repeated settings, and local paths in published files."""

from __future__ import annotations

import hashlib
import json
import logging
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
    tmp_path, small_digits_folder, tiny_vit, caplog
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
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_finetune"):
        run_training(quick_argv(tiny_vit, out, "--train_dir", small_digits_folder, "--overwrite_output_dir",
                                "true", "--seed", "5"))  # fmt: skip
    log = caplog.text
    assert "replaced the previous run" in log and "checkpoint-1, config.json" in log
    assert (out / "my_notes.txt").read_text() == "keep me\n"
    assert "Resuming from" not in log  # the old run's checkpoint was removed, not resumed from
    after = checksums(out)
    for name in ("model.safetensors", "checkpoint-1/model.safetensors"):
        assert after[name] != before[name]
    assert "my_notes.txt" not in json.loads((out / ".hf_finetune_manifest.json").read_text())["entries"]


def test_the_probe_replaces_its_previous_run_only_once_it_starts(
    tmp_path, small_digits_folder, tiny_vit, caplog
):
    from hf_finetune.probe.arguments import parse_probe_args
    from hf_finetune.probe.run import run_probe

    out = tmp_path / "probe"

    def probe(train_dir, *extra):
        argv = ["--model_name_or_path", str(tiny_vit), "--output_dir", str(out), "--train_dir", str(train_dir),
                "--feature_cache_dir", str(tmp_path / "features"), "--use_cpu", "true",
                "--dataloader_num_workers", "0", *extra]  # fmt: skip
        return run_probe(*parse_probe_args(argv))

    probe(small_digits_folder)
    before = checksums(out)
    with pytest.raises(UserError, match="no_such_pictures"):
        probe(tmp_path / "no_such_pictures", "--overwrite_output_dir", "true")
    assert checksums(out) == before
    with caplog.at_level(logging.WARNING, logger="hf_finetune.outputs.manifest"):
        probe(small_digits_folder, "--overwrite_output_dir", "true", "--classifier", "knn")
    assert "replaced the previous run" in caplog.text and "all_results.json" in caplog.text
    assert json.loads((out / "run_summary.json").read_text())["classifier"] == "knn"


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
    from hf_finetune.commands.cli import main

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
    from hf_finetune.commands.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert expected in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path):
    from hf_finetune.commands.cli import parse_train_args

    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\nlearning_rate: 1e-4\nmax_train_samples: '12'\n")
    _, data_args, _, training_args, _ = parse_train_args(["--config", str(config)])
    assert training_args.learning_rate == 1e-4 and data_args.max_train_samples == 12


# --------------------------------------------------------------------------------------------------------
# 7. 16-bit pictures are scaled from their bit depth, not from their values
# --------------------------------------------------------------------------------------------------------
def test_sixteen_bit_files_keep_their_brightness_whatever_their_maximum(tmp_path):
    import numpy as np
    from PIL import Image

    from hf_finetune.data.images import load_rgb

    shades = {}
    for top in (255, 256, 1000, 65535):
        path = tmp_path / f"max_{top}.png"
        values = np.array([[0, 255, top]], dtype=np.uint16)
        Image.frombytes("I;16", (3, 1), values.astype("<u2").tobytes()).save(path)
        with Image.open(path) as check:
            assert check.mode.startswith("I")  # stored and decoded as 16-bit
        shades[top] = list(np.asarray(load_rgb(str(path)))[0, :, 0])
    # The same 16-bit value gives the same 8-bit shade in every file, and the maximum is value / 257.
    assert shades == {255: [0, 1, 1], 256: [0, 1, 1], 1000: [0, 1, 4], 65535: [0, 1, 255]}


# --------------------------------------------------------------------------------------------------------
# Image folders: 2. the class is the first folder level; 3. loose pictures; 4. an output folder inside
# --------------------------------------------------------------------------------------------------------
def digit_pictures(n: int, cls: int, offset: int = 0):
    from conftest import digits_dataset

    return digits_dataset(n, classes=(cls,), offset=offset)["image"]


def nested_folder(root: Path) -> Path:
    """brick/batch1, brick/batch2, grass/batch1, grass/batch2: 6 pictures per class, in two batches."""
    for cls, name in enumerate(("brick", "grass")):
        for batch in ("batch1", "batch2"):
            (root / name / batch).mkdir(parents=True)
            for i, image in enumerate(digit_pictures(3, cls, offset=0 if batch == "batch1" else 3)):
                image.save(root / name / batch / f"{i}.png")
    return root


def test_sub_folders_of_a_class_folder_belong_to_that_class(tmp_path, caplog):
    from collections import Counter

    from hf_finetune.config import DataArguments
    from hf_finetune.data.prepare import prepare_data

    train = nested_folder(tmp_path / "train")
    (train / "grass" / "loose.png").write_bytes((train / "grass" / "batch1" / "0.png").read_bytes())
    with caplog.at_level(logging.INFO, logger="hf_finetune.data"):
        data = prepare_data(DataArguments(train_dir=str(train), train_val_split=0.25), seed=0)
    assert data.labels == ["brick", "grass"]  # never batch1 / batch2
    counts = Counter(data.labels[i] for d in data.splits.values() for i in d[data.label_column])
    assert counts == {"brick": 6, "grass": 7}
    assert "12 picture(s) in deeper sub-folders belong to their class (brick 6, grass 6)" in caplog.text


def test_pictures_directly_in_train_dir_are_named(tmp_path):
    from hf_finetune.config import DataArguments
    from hf_finetune.data.prepare import prepare_data

    train = nested_folder(tmp_path / "train")
    digit_pictures(1, 0)[0].save(train / "stray.png")
    with pytest.raises(
        UserError, match=r"1 picture\(s\) directly inside it, not in a class folder \(e.g. stray.png\)"
    ):
        prepare_data(DataArguments(train_dir=str(train)), seed=0)


def test_an_output_dir_inside_train_dir_is_not_trained_on(tmp_path, tiny_vit, caplog):
    train = nested_folder(tmp_path / "train")
    out = train / "out"
    with caplog.at_level(logging.INFO, logger="hf_finetune"):
        for rerun in ("false", "true"):
            run_training(quick_argv(tiny_vit, out, "--train_dir", train, "--overwrite_output_dir", rerun))
    splits = json.loads((out / "data_splits.json").read_text())
    assert splits["labels"] == ["brick", "grass"]  # not a third class `out` of report pictures
    assert sum(s["size"] for s in splits["splits"].values()) == 12
    assert "train_dir: not used as data: out (output folder(s) of hf-finetune" in caplog.text


# --------------------------------------------------------------------------------------------------------
# 5. splits that share pictures
# --------------------------------------------------------------------------------------------------------
def test_train_dir_equal_to_test_dir_is_refused(tmp_path):
    from hf_finetune.config import DataArguments
    from hf_finetune.data.prepare import prepare_data

    train = nested_folder(tmp_path / "train")
    with pytest.raises(UserError, match=r"Every picture of the test split \(12\) is also in another split"):
        prepare_data(DataArguments(train_dir=str(train), test_dir=str(train)), seed=0)


def test_copies_across_splits_are_counted_and_recorded(tmp_path, caplog):
    from hf_finetune.config import DataArguments
    from hf_finetune.data.prepare import prepare_data

    train = nested_folder(tmp_path / "train")
    test = tmp_path / "test"
    for cls, name in enumerate(("brick", "grass")):
        (test / name).mkdir(parents=True)
        for i, image in enumerate(digit_pictures(4, cls, offset=20)):
            image.save(test / name / f"new_{i}.png")
    # The same pictures under other names: found by their contents.
    for source in ("brick/batch1/0.png", "grass/batch2/1.png", "grass/batch2/2.png"):
        (test / source.split("/")[0] / f"copy_of_{source.replace('/', '_')}").write_bytes(
            (train / source).read_bytes()
        )
    with caplog.at_level(logging.WARNING, logger="hf_finetune.data"):
        data = prepare_data(
            DataArguments(train_dir=str(train), test_dir=str(test), train_val_split=0.25), seed=0
        )
    overlap = data.report["test"]["overlap"]
    assert overlap["train"] + overlap["validation"] == 3 and len(data.splits["test"]) == 11
    assert "3 of 11 test picture(s) are also in another split" in caplog.text


# --------------------------------------------------------------------------------------------------------
# 6. labels that differ by surrounding spaces are one class; by case, a warning
# --------------------------------------------------------------------------------------------------------
def test_csv_labels_are_stripped_and_case_collisions_named(tmp_path, caplog):
    from hf_finetune.config import DataArguments
    from hf_finetune.data.prepare import prepare_data

    rows = ["path,label"]
    for cls, names in enumerate((("brick", "Brick"), (" grass", "grass "))):
        for i, image in enumerate(digit_pictures(8, cls)):
            image.save(tmp_path / f"{cls}_{i}.png")
            rows.append(f'{cls}_{i}.png,"{names[i % 2]}"')
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.INFO, logger="hf_finetune.data"):
        data = prepare_data(
            DataArguments(train_file=str(tmp_path / "data.csv"), train_val_split=0.25), seed=0
        )
    assert data.labels == ["Brick", "brick", "grass"]
    assert "Labels 'Brick' / 'brick' differ only by case" in caplog.text


# --------------------------------------------------------------------------------------------------------
# 10. files that can be published name pictures relative to the data source
# --------------------------------------------------------------------------------------------------------
def test_published_files_hold_no_local_paths_and_bad_rows_are_rows_of_the_file(
    tmp_path, tiny_vit, monkeypatch, capsys
):
    from hf_finetune.commands.cli import main

    monkeypatch.chdir(tmp_path)
    pictures = tmp_path / "pics"
    pictures.mkdir()
    rows = ["path,label"]
    for i in range(24):
        digit_pictures(1, i % 3, offset=i)[0].save(pictures / f"{i}.png")
        rows.append(f"pics/{i}.png,{'abc'[i % 3]}")
    (pictures / "7.png").write_bytes(b"not a picture")  # row 7 of the file
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    run_training(
        quick_argv(tiny_vit, out, "--train_file", tmp_path / "data.csv", "--train_test_split", "0.25")
    )

    bad = json.loads((out / "bad_images.json").read_text())
    assert [(b["index"], b["image"]) for b in bad] == [(7, "pics/7.png")]
    errors = json.loads((out / "most_confident_errors.json").read_text())
    assert errors["shown"] and all(e["image"].startswith("pics/") for e in errors["shown"])

    capsys.readouterr()
    main(["push", str(out), "--repo_id", "someone/model", "--dry_run"])
    listed = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert {"bad_images.json", "most_confident_errors.json", "data_splits.json"} <= set(listed)
    for name in listed:
        if name.endswith((".json", ".md", ".yaml", ".txt")):
            assert str(tmp_path) not in (out / name).read_text(), name
